"""GPT-2: a pre-LayerNorm causal decoder with learned positions, a tied LM head and a static KV cache.

Module and parameter names equal transformers' PyTorch names (`transformer.h.0.attn.c_attn.weight`);
GPT-2's Conv1D weights keep their [in, out] layout. The cache is the Linen "cache" collection in the
transformers-v4 layout (per attention layer `cached_key`, `cached_value` [B, max_length, H, D] and a
scalar `cache_index`), so one compiled decode step serves every step of a `lax.while_loop`.
"""

import collections.abc
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import GPT2Config

from flaxhf.generation import GenerationMixin
from flaxhf.models import heads, losses
from flaxhf.models import outputs as O
from flaxhf.models.base import FlaxPreTrainedModel, flatten, model_class, unflatten
from flaxhf.models.layers import (Conv1D, Embedding, LayerNorm, LayerStack, attention_bias,
                                  constrain, dot_product_attention, get_activation, layer_stack,
                                  merge_heads, split_heads)


def positions_from_mask(attention_mask):
  """Position ids [B, L]: how many tokens up to itself a token attends, less one; 1 on masked tokens.

  For a [B, L] padding mask that is transformers' generation rule (cumsum(mask) - 1, masked set to
  1), so left-padded rows start at 0; a [B, L, L] per-document mask restarts them at each document.
  """
  mask = attention_mask.astype(bool)
  if mask.ndim == 2:
    seen, real = jnp.cumsum(mask, axis=-1), mask
  else:
    causal_LxL = jnp.tril(jnp.ones(mask.shape[-2:], bool))
    seen, real = jnp.sum(mask & causal_LxL, axis=-1), jnp.diagonal(mask, axis1=-2, axis2=-1)
  return jnp.where(real, seen - 1, 1).astype(jnp.int32)


def decoder_mask(attention_mask, first_slot, num_queries):
  """[B, T, S] bool: query t, at slot first_slot + t, may see key slot s <= its own that the mask allows.

  `attention_mask` is [B, S] (padding, or the cache slots in use) or [B, T, S] (per query, e.g.
  documents packed in one row). Keys past the queries are causal-masked, so cache slots not yet
  written (s >= cache_index + T) are never seen.
  """
  q_slot_T = first_slot + jnp.arange(num_queries)
  causal_TxS = jnp.arange(attention_mask.shape[-1])[None, :] <= q_slot_T[:, None]
  allowed = attention_mask[:, None, :] if attention_mask.ndim == 2 else attention_mask
  return causal_TxS[None] & allowed.astype(bool)


def last_token_index(input_ids_BxL, pad_token_id):
  """GPT2ForSequenceClassification's token: the rightmost that is not pad_token_id (0 if none is)."""
  b, l = input_ids_BxL.shape
  if pad_token_id is None:
    if b != 1:
      raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined. Set "
                       "config.pad_token_id (e.g. to the tokenizer's pad or eos id), as transformers asks.")
    return jnp.full((b,), l - 1)
  return jnp.argmax(jnp.arange(l) * (input_ids_BxL != pad_token_id), axis=-1)


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
    first_slot = 0
    decoding = self.has_variable("cache", "cached_key")
    if init_cache or decoding:
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if decoding:  # write the T new keys/values at cache_index, then attend over every slot
      first_slot = index.value
      at = (0, first_slot, 0, 0)
      cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), at)
      cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), at)
      index.value = first_slot + q.shape[1]
      k, v = cached_k.value, cached_v.value
    if c.reorder_and_upcast_attn:  # q.k in float32 even under bf16 (a no-op in float32)
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    bias = attention_bias(decoder_mask(attention_mask, first_slot, q.shape[1]), d)
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attn_pdrop,
                                       deterministic=deterministic, module=self, dtype=d,
                                       scale=self.scale(q.shape[-1], layer_idx))
    out = Conv1D(c.n_embd, ("heads", "embed"), _proj_std(c), dtype=d, name="c_proj")(merge_heads(ctx))
    out = nn.Dropout(c.resid_pdrop)(out, deterministic=deterministic)
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
    x = x + nn.Dropout(c.resid_pdrop)(m, deterministic=deterministic)
    return constrain(x, ("batch", "seq", "embed")), probs


class GPT2Module(nn.Module):
  """The decoder (`GPT2Model`); with add_pooling_layer, pooler_output is the last non-pad token's state."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = False  # only the sequence classifier reads a pooled state
  stack: LayerStack = LayerStack()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False,
               init_cache=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    if token_type_ids is not None:
      raise ValueError("flaxhf's GPT-2 takes no token_type_ids (its tokenizer does not make them).")
    if c.add_cross_attention:
      raise NotImplementedError("GPT-2 with add_cross_attention=True is not supported by flaxhf.")
    if position_ids is None:
      position_ids = positions_from_mask(attention_mask)
    x = Embedding(c.vocab_size, c.n_embd, std=std, dtype=d, name="wte")(input_ids)
    x = x + Embedding(c.n_positions, c.n_embd, axes=(None, "embed"), std=std, dtype=d,
                      name="wpe")(position_ids)
    x = nn.Dropout(c.embd_pdrop)(x, deterministic=deterministic)
    embedded = x
    x, outs, attentions = layer_stack(
        lambda name: GPT2Block(c, d, name=name), c.n_layer, "h", self.stack, x, attention_mask,
        deterministic, output_attentions, init_cache, pass_index=True, collect=output_hidden_states)
    x = LayerNorm(c.layer_norm_epsilon, dtype=d, name="ln_f")(x)
    # As transformers: each block's input, then the last state after ln_f.
    hidden = (embedded,) + outs[:-1] + (x,)
    hidden = hidden if output_hidden_states else None
    attentions = attentions if output_attentions else None
    if self.add_pooling_layer:
      pooled = x[jnp.arange(x.shape[0]), last_token_index(input_ids, c.pad_token_id)]
      return O.BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                          hidden_states=hidden, attentions=attentions)
    return O.BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden, attentions=attentions)


class GPT2Head(heads.Head):
  """The family's hooks: the decoder under `transformer`, GPT-2's dropout rule and its `score` layer."""

  stack: LayerStack = LayerStack()

  def encoder(self):
    return GPT2Module(self.config, self.dtype, add_pooling_layer=self.pooler, stack=self.stack,
                      name="transformer")

  def classifier_dropout(self):  # GPT2ForTokenClassification's rule; GPT2Config has neither field
    c = self.config
    for name in ("classifier_dropout", "hidden_dropout"):
      if getattr(c, name, None) is not None:
        return getattr(c, name)
    return 0.1

  def qa_num_outputs(self):
    return 2  # GPT2ForQuestionAnswering's qa_outputs is always (start, end)

  def classify(self, out, num_outputs, deterministic):
    # GPT2ForSequenceClassification: `score`, without bias or dropout, on the last non-pad token.
    return self.linear(num_outputs, "score", use_bias=False)(out.pooler_output)


class GPT2LMHeadModule(GPT2Head):
  """`GPT2LMHeadModel`: logits over the vocabulary from wte (tied) or its own `lm_head` (untied)."""

  task = "causal_lm"
  output_class = O.CausalLMOutput

  def predict(self, encoder, out, deterministic, shape):
    c, x = self.config, out.last_hidden_state
    if c.tie_word_embeddings:
      wte_VxE = nn.meta.unbox(encoder.variables["params"]["wte"]["weight"])
      return {"logits": jnp.einsum("...e,ve->...v", x, wte_VxE.astype(self.dtype))}
    return {"logits": self.linear(c.vocab_size, "lm_head", ("vocab", "embed"), use_bias=False)(x)}


class GPT2ForSequenceClassificationModule(GPT2Head, heads.SequenceClassification):
  pass


class GPT2ForTokenClassificationModule(GPT2Head, heads.TokenClassification):
  pass


class GPT2ForQuestionAnsweringModule(GPT2Head, heads.QuestionAnswering):
  pass


def _cache_shape(cache):
  """(batch, max_length) of a cache from init_cache, with a clear error for anything else."""
  keys = [v for k, v in flatten(cache).items() if k.endswith("cached_key")] if isinstance(
      cache, collections.abc.Mapping) else []  # a dict, or a FrozenDict from older Flax code
  if not keys:
    raise ValueError("past_key_values must be the cache from model.init_cache(batch_size, max_length) "
                     "(or a previous call's outputs.past_key_values).")
  return tuple(keys[0].shape[:2])


class FlaxGPT2PreTrainedModel(FlaxPreTrainedModel):
  """GPT-2 models with transformers v4's Flax decoder call: `past_key_values=` and `init_cache`."""

  config_class = GPT2Config
  base_model_prefix = "transformer"
  uses_token_type_ids = False
  # Old checkpoints' causal-mask buffers, and the copy of wte that tied checkpoints may carry.
  ignore_on_load = (r"(^|\.)attn\.(bias|masked_bias)$", r"^lm_head\.weight$")

  def init_cache(self, batch_size: int, max_length: int):
    """A zero KV cache of `max_length` slots; its shapes come from jax.eval_shape, so no params are made."""
    if self.scan_layers:
      # A scanned cache would stack on a leading layer axis, but generation's beam reordering
      # gathers axis 0 of every cache array: scan is a training-path feature for now.
      raise NotImplementedError(
          f"{type(self).__name__} was built with scan_layers=True, whose calls run full sequences "
          "only: a KV cache (init_cache, past_key_values) needs the unscanned model. generate() "
          "works (it decodes with an unscanned view of the same weights), or load the checkpoint "
          "without scan_layers.")
    if max_length > self.config.n_positions:
      raise ValueError(f"max_length={max_length} exceeds GPT-2's n_positions={self.config.n_positions} "
                       "learned positions; generate fewer tokens or shorten the prompt.")
    ids = jnp.ones((batch_size, max_length), jnp.int32)
    shapes = jax.eval_shape(lambda: self.module.init(jax.random.key(0), ids, jnp.ones_like(ids),
                                                     init_cache=True)["cache"])
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def _check_inputs(self, input_ids, attention_mask, position_ids, past_key_values):
    """Validated int32 (attention_mask, position_ids), with the defaults of each mode."""
    b, t = input_ids.shape
    as_int = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
    attention_mask, position_ids = as_int(attention_mask), as_int(position_ids)
    if past_key_values is None:
      if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
      if tuple(attention_mask.shape) not in ((b, t), (b, t, t)):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{(b, t)}: pass [batch, length] (padding) or [batch, length, length] (which "
                         f"keys each query may attend, e.g. packed documents).")
    else:
      if self.task not in (None, "causal_lm"):
        raise ValueError(f"past_key_values is for FlaxGPT2Model and FlaxGPT2LMHeadModel, not "
                         f"{type(self).__name__}.")
      cache_b, max_length = _cache_shape(past_key_values)
      if position_ids is None:
        raise ValueError("position_ids are required with past_key_values: pass the positions "
                         "[batch, new_tokens] of the new tokens (e.g. from cumsum(attention_mask) - 1).")
      if attention_mask is None:
        attention_mask = jnp.ones((b, max_length), jnp.int32)
      if cache_b != b or tuple(attention_mask.shape) != (b, max_length):
        raise ValueError(f"With past_key_values (a cache of batch {cache_b} and {max_length} slots), "
                         f"attention_mask must be [batch, max_length] = {(b, max_length)} over every "
                         f"cache slot; got {tuple(attention_mask.shape)} for input_ids {(b, t)}.")
    if position_ids is not None and tuple(position_ids.shape) != (b, t):
      raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but input_ids has {(b, t)}; "
                       "they must match.")
    return attention_mask, position_ids

  def __call__(self, input_ids, attention_mask=None, position_ids=None, params=None,
               past_key_values=None, dropout_rng=None, train: bool = False,
               output_attentions=None, output_hidden_states=None, return_dict=None, labels=None,
               token_type_ids=None, start_positions=None, end_positions=None):
    if token_type_ids is not None:
      raise ValueError(f"{type(self).__name__} takes no token_type_ids (GPT-2's tokenizer does not "
                       "make them); drop the argument.")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}.")
    attention_mask, position_ids = self._check_inputs(input_ids, attention_mask, position_ids,
                                                      past_key_values)
    if train and dropout_rng is None:
      raise ValueError("train=True applies dropout and needs dropout_rng=jax.random.key(...).")
    variables = {"params": self.params if params is None else params}
    if past_key_values is not None:
      variables["cache"] = past_key_values
    outputs = self.module.apply(
        variables, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        deterministic=not train, output_attentions=bool(output_attentions),
        output_hidden_states=bool(output_hidden_states),
        rngs={"dropout": dropout_rng} if train else {},
        mutable=["cache"] if past_key_values is not None else False)
    if past_key_values is not None:
      outputs, mutated = outputs
      outputs = outputs.replace(past_key_values=mutated["cache"])
    if self.task == "question_answering" and start_positions is not None:
      labels = (jnp.asarray(start_positions), jnp.asarray(end_positions))
    if labels is not None:
      labels = labels if isinstance(labels, tuple) else jnp.asarray(labels)
      outputs = outputs.replace(loss=losses.compute_loss(self.task, outputs, labels, self.config))
    return outputs.to_tuple() if return_dict is False else outputs


class _ScannedGeneration(GenerationMixin):
  """generate() of a scanned model: the unscanned twin decodes over the unstacked weights."""

  def generate(self, input_ids, *args, params=None, **kwargs):
    if not self.scan_layers:
      return super().generate(input_ids, *args, params=params, **kwargs)
    twin = self.__dict__.get("_decode_twin")
    if twin is None:  # kept, so its compiled decode programs are reused across calls
      twin = type(self)(self.config, dtype=self.dtype, _do_init=False, input_shape=self.input_shape)
      self.__dict__["_decode_twin"] = twin
    twin.generation_config = self.generation_config
    # Slices of the stacked arrays (traced inside jit/pmap, copies outside it).
    flat = self._unstack(flatten(self.params if params is None else params))
    return twin.generate(input_ids, *args, params=unflatten(flat, twin.param_shapes()), **kwargs)


def _declare(suffix, module, task, mixins=()):
  return model_class(f"FlaxGPT2{suffix}", FlaxGPT2PreTrainedModel, module, task, mixins)


FlaxGPT2Model = _declare("Model", GPT2Module, None)
FlaxGPT2LMHeadModel = _declare("LMHeadModel", GPT2LMHeadModule, "causal_lm", (_ScannedGeneration,))
FlaxGPT2ForSequenceClassification = _declare(
    "ForSequenceClassification", GPT2ForSequenceClassificationModule, "sequence_classification")
FlaxGPT2ForTokenClassification = _declare(
    "ForTokenClassification", GPT2ForTokenClassificationModule, "token_classification")
FlaxGPT2ForQuestionAnswering = _declare(
    "ForQuestionAnswering", GPT2ForQuestionAnsweringModule, "question_answering")
