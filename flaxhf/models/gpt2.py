"""GPT-2: a pre-LayerNorm causal decoder with learned positions, a tied LM head and a static KV cache.

Module and parameter names equal transformers' PyTorch names (`transformer.h.0.attn.c_attn.weight`);
GPT-2's Conv1D weights keep their [in, out] layout. The cache is the Linen "cache" collection in the
transformers-v4 layout (per attention layer `cached_key`, `cached_value` [B, max_length, H, D] and a
scalar `cache_index`), so one compiled decode step serves every step of a `lax.while_loop`.
"""

import math

import flax.linen as nn
import jax.numpy as jnp
from transformers import GPT2Config

from flaxhf.models import heads
from flaxhf.models.base import model_class
# positions_from_mask, last_token_index: re-exported (they lived here before the decoder shell).
from flaxhf.models.decoder import (CausalLM, DecoderGeneration, DecoderHead,  # noqa: F401
                                   DecoderModule, DecoderPreTrainedModel, cache_kv, decoder_mask,
                                   last_token_index, positions_from_mask)
from flaxhf.models.layers import (Dropout, Conv1D, Embedding, LayerNorm, LayerStack, attention_bias,
                                  constrain, dot_product_attention, get_activation,
                                  merge_heads, split_heads)


def _proj_std(config):
  # GPT-2's scaled init of the residual projections: two per block add up over depth.
  return config.initializer_range / math.sqrt(2 * config.n_layer)


class GPT2Attention(nn.Module):
  """Causal self-attention with a fused q/k/v `c_attn`; keeps the KV cache when one is given."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  def scale(self, head_dim, layer_idx):
    c = self.config
    scale = 1.0 / math.sqrt(head_dim) if c.scale_attn_weights else 1.0
    return scale / (layer_idx + 1) if c.scale_attn_by_inverse_layer_idx else scale

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, deterministic, output_attentions, init_cache=False,
               layer_idx=0):
    c, d = self.config, self.dtype
    qkv = Conv1D(3 * c.n_embd, ("embed", "heads"), c.initializer_range, dtype=d, name="c_attn")(x_BxTxE)
    q, k, v = (split_heads(t, c.n_head) for t in jnp.split(qkv, 3, axis=-1))
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    k, v, first_slot = cache_kv(self, k, v, init_cache)
    if c.reorder_and_upcast_attn:  # q.k in float32 even under bf16 (a no-op in float32)
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    bias = attention_bias(decoder_mask(attention_mask, first_slot, q.shape[1]), d)
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attn_pdrop,
                                       deterministic=deterministic, module=self, dtype=d,
                                       scale=self.scale(q.shape[-1], layer_idx))
    out = Conv1D(c.n_embd, ("heads", "embed"), _proj_std(c), dtype=d, name="c_proj")(merge_heads(ctx))
    out = Dropout(c.resid_pdrop)(out, deterministic=deterministic)
    return out, (probs if output_attentions else None)


class GPT2Block(nn.Module):
  """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); `layer_idx` is traced under scan."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, deterministic, output_attentions, init_cache,
               layer_idx=0):
    c, d = self.config, self.dtype
    inner = c.n_inner if c.n_inner is not None else 4 * c.n_embd
    h = LayerNorm(c.layer_norm_epsilon, dtype=d, name="ln_1")(x_BxTxE)
    a, probs = GPT2Attention(c, d, name="attn")(h, attention_mask, deterministic,
                                                output_attentions, init_cache, layer_idx)
    x = x_BxTxE + a
    m = Conv1D(inner, ("embed", "mlp"), c.initializer_range, dtype=d, name="mlp.c_fc")(
        LayerNorm(c.layer_norm_epsilon, dtype=d, name="ln_2")(x))
    m = get_activation(c.activation_function)(m)
    m = Conv1D(c.n_embd, ("mlp", "embed"), _proj_std(c), dtype=d, name="mlp.c_proj")(m)
    x = x + Dropout(c.resid_pdrop)(m, deterministic=deterministic)
    return constrain(x, ("batch", "seq", "embed")), probs


class GPT2Module(DecoderModule):
  """The decoder (`GPT2Model`): learned positions, blocks `h.{i}`, `ln_f`."""

  layers_name = "h"

  def embed(self, input_ids, position_ids, deterministic):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    if c.add_cross_attention:
      raise NotImplementedError("GPT-2 with add_cross_attention=True is not supported by flaxhf.")
    x = Embedding(c.vocab_size, c.n_embd, std=std, dtype=d, name="wte")(input_ids)
    x = x + Embedding(c.n_positions, c.n_embd, axes=(None, "embed"), std=std, dtype=d,
                      name="wpe")(position_ids)
    return Dropout(c.embd_pdrop)(x, deterministic=deterministic), ()

  def layer(self, name):
    return GPT2Block(self.config, self.dtype, name=name)

  def num_layers(self):
    return self.config.n_layer

  def final_norm(self, x):
    return LayerNorm(self.config.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x)


class GPT2Head(DecoderHead):
  """The family's hooks: the decoder under `transformer`, its embedding `wte`."""

  stack: LayerStack = LayerStack()

  def encoder(self):
    return GPT2Module(self.config, self.dtype, add_pooling_layer=self.pooler, stack=self.stack,
                      name="transformer")

  def embedding_path(self):
    return ("wte",)


class GPT2LMHeadModule(GPT2Head, CausalLM):
  """`GPT2LMHeadModel`: logits over the vocabulary from wte (tied) or its own `lm_head` (untied)."""


class GPT2ForSequenceClassificationModule(GPT2Head, heads.SequenceClassification):
  pass


class GPT2ForTokenClassificationModule(GPT2Head, heads.TokenClassification):
  pass


class GPT2ForQuestionAnsweringModule(GPT2Head, heads.QuestionAnswering):
  pass


class FlaxGPT2PreTrainedModel(DecoderPreTrainedModel):
  """GPT-2 models with transformers v4's Flax decoder call: `past_key_values=` and `init_cache`."""

  config_class = GPT2Config
  base_model_prefix = "transformer"
  # Old checkpoints' causal-mask buffers, and the copy of wte that tied checkpoints may carry.
  ignore_on_load = (r"(^|\.)attn\.(bias|masked_bias)$", r"^lm_head\.weight$")

  def check_cache_length(self, max_length):
    if max_length > self.config.n_positions:
      raise ValueError(f"max_length={max_length} exceeds GPT-2's n_positions={self.config.n_positions} "
                       "learned positions; generate fewer tokens or shorten the prompt.")


def _declare(suffix, module, task, mixins=()):
  return model_class(f"FlaxGPT2{suffix}", FlaxGPT2PreTrainedModel, module, task, mixins)


FlaxGPT2Model = _declare("Model", GPT2Module, None)
FlaxGPT2LMHeadModel = _declare("LMHeadModel", GPT2LMHeadModule, "causal_lm", (DecoderGeneration,))
FlaxGPT2ForSequenceClassification = _declare(
    "ForSequenceClassification", GPT2ForSequenceClassificationModule, "sequence_classification")
FlaxGPT2ForTokenClassification = _declare(
    "ForTokenClassification", GPT2ForTokenClassificationModule, "token_classification")
FlaxGPT2ForQuestionAnswering = _declare(
    "ForQuestionAnswering", GPT2ForQuestionAnsweringModule, "question_answering")
