"""Gemma, Gemma 2 and Gemma 3 (text): the Llama-style decoder with Gemma's norms and scales.

All three: RMSNorms that scale by 1 + weight (weights start at zero), token embeddings times
sqrt(hidden_size) (in the compute dtype, as transformers casts the scale to the weights' dtype),
a gated MLP (GeGLU), head_dim from the config, tied embeddings. Gemma 2 adds the sandwich norms
(`post_attention_layernorm` on the attention output, `pre_`/`post_feedforward_layernorm` around the
MLP), attention-logit and final-logit soft caps, query_pre_attn_scalar ** -0.5 as the attention
scale, and `layer_types` of sliding and full attention. Gemma 3 adds q/k norms and rope parameters
per layer type (a local base for the sliding layers). The blocks are llama.py's and decoder.py's;
module and parameter names equal transformers' PyTorch names.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

from flaxhf.models import heads
from flaxhf.models.base import model_class, model_family
from flaxhf.models.decoder import (CausalLM, DecoderGeneration, DecoderHead, DecoderModule,
                                   GQAttention, check_whole_head_rotary, rope_parameters,
                                   rotary_cos_sin)
from flaxhf.models.layers import Embedding, LayerStack, RMSNorm, constrain, get_activation
from flaxhf.models.llama import LlamaMLP, LlamaPreTrainedModel, per_layer, sliding_windows


@dataclasses.dataclass(frozen=True)
class Flavor:
  """The family's switches, read from a config."""

  activation: str             # the MLP's gate activation
  sandwich_norms: bool        # Gemma 2/3: norms on the attention and MLP outputs too
  qk_norm: bool               # Gemma 3: RMSNorm over each head of q and k
  scale: Optional[float]      # the attention scale (None: head_dim ** -0.5)
  attn_softcap: Optional[float]
  eager: bool                 # transformers runs it with eager attention only (no SDPA path)
  rope_per_layer_type: bool   # Gemma 3: rope_parameters[layer_type]


def flavor(c) -> Flavor:
  t = c.model_type
  if t == "gemma":
    return Flavor(c.hidden_act, False, False, None, None, False, False)
  if t == "gemma2":
    return Flavor(c.hidden_activation, True, False, c.query_pre_attn_scalar ** -0.5,
                  c.attn_logit_softcapping, True, False)
  if t == "gemma3_text":
    # transformers 5's Gemma3Attention does not pass attn_logit_softcapping on: no cap, as there.
    return Flavor(c.hidden_activation, True, True, c.query_pre_attn_scalar ** -0.5, None, False, True)
  raise ValueError(f"model_type {t!r} is not a Gemma family; flaxhf.models.gemma serves gemma, "
                   "gemma2, gemma3_text.")


def rope_kinds(c):
  """(the layer types with their own rope parameters, each layer's index into them), or (None,)
  when every layer shares the config's one rope."""
  if not flavor(c).rope_per_layer_type:
    return (None,), None
  kinds = tuple(sorted(set(c.layer_types)))
  return kinds, tuple(kinds.index(t) for t in c.layer_types)


def check_config(c):
  """Raises naming any switch of this config that flaxhf does not implement."""
  f = flavor(c)
  if getattr(c, "use_bidirectional_attention", None):
    raise ValueError(f"use_bidirectional_attention=True is not supported by flaxhf's {c.model_type} "
                     "(its decoder attends causally).")
  for kind in rope_kinds(c)[0]:
    rope_parameters(c, kind)
    check_whole_head_rotary(c, kind)
  sliding_windows(c)
  get_activation(f.activation)
  if c.num_attention_heads % c.num_key_value_heads:
    raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                     f"num_key_value_heads={c.num_key_value_heads}.")


class GemmaDecoderLayer(nn.Module):
  """Gemma: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).
  Gemma 2/3: x + post_attention_layernorm(attn(input_layernorm(x))), then
  x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))."""

  config: GemmaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, cos_KxBxTxR, sin_KxBxTxR, deterministic,
               output_attentions, init_cache, layer_idx=0):
    c, d, f = self.config, self.dtype, flavor(self.config)

    def norm(name):
      return RMSNorm(c.rms_norm_eps, dtype=d, unit_offset=True, name=name)

    # This layer's rope (Gemma 3: its layer type's) and window; tables, as layer_idx may be traced.
    kind = per_layer(rope_kinds(c)[1], layer_idx)
    kind = 0 if kind is None else kind
    cos_sin = (cos_KxBxTxR[kind], sin_KxBxTxR[kind])
    attn = GQAttention(c, qkv_bias=c.attention_bias, o_bias=c.attention_bias, qk_norm=f.qk_norm,
                       unit_offset_norm=True, scale=f.scale, softcap=f.attn_softcap,
                       zero_unseen=not f.eager, dtype=d, name="self_attn")
    a, probs = attn(norm("input_layernorm")(x_BxTxE), attention_mask, cos_sin,
                    per_layer(sliding_windows(c), layer_idx), deterministic, output_attentions,
                    init_cache)
    x = x_BxTxE + (norm("post_attention_layernorm")(a) if f.sandwich_norms else a)
    h = norm("pre_feedforward_layernorm" if f.sandwich_norms else "post_attention_layernorm")(x)
    h = LlamaMLP(c, d, f.activation, name="mlp")(h)
    x = x + (norm("post_feedforward_layernorm")(h) if f.sandwich_norms else h)
    return constrain(x, ("batch", "seq", "embed")), probs


class GemmaModule(DecoderModule):
  """The decoder (`GemmaModel`, `Gemma2Model`, `Gemma3TextModel`): `embed_tokens` (scaled by
  sqrt(hidden_size)), `layers.{i}`, `norm`; rotary positions, one set per rope kind."""

  def embed(self, input_ids, position_ids, deterministic):
    c, d = self.config, self.dtype
    x = Embedding(c.vocab_size, c.hidden_size, std=c.initializer_range, padding_idx=c.pad_token_id,
                  dtype=d, name="embed_tokens")(input_ids)
    x = x * jnp.asarray(c.hidden_size ** 0.5, d)
    cos_sin = [rotary_cos_sin(c, position_ids, d, kind) for kind in rope_kinds(c)[0]]
    return x, tuple(jnp.stack(parts) for parts in zip(*cos_sin))  # (cos, sin) [K, B, T, R]

  def layer(self, name):
    return GemmaDecoderLayer(self.config, self.dtype, name=name)

  def final_norm(self, x):
    return RMSNorm(self.config.rms_norm_eps, dtype=self.dtype, unit_offset=True, name="norm")(x)


class GemmaHead(DecoderHead):
  """The family's hooks: the decoder under `model`, its embedding `embed_tokens`, `score` heads."""

  stack: LayerStack = LayerStack()
  token_classifier = "score"

  def encoder(self):
    return GemmaModule(self.config, self.dtype, add_pooling_layer=self.pooler, stack=self.stack,
                       name="model")

  def embedding_path(self):
    return ("embed_tokens",)


def _head(generic):
  return type(f"Gemma{generic.__name__}Module", (GemmaHead, generic), {"__module__": __name__})


# Public-class suffix -> Linen module: the heads transformers 5 has (none answers questions).
MODULES = {"Model": GemmaModule, "ForCausalLM": _head(CausalLM),
           **{"For" + h.__name__: _head(h) for h in (heads.SequenceClassification,
                                                     heads.TokenClassification)}}


class GemmaPreTrainedModel(LlamaPreTrainedModel):
  """The Gemma families' models: transformers v4's Flax decoder call and `generate`."""

  check_config = staticmethod(check_config)


def _family(arch, config_class, modules=MODULES):
  return model_family(arch, config_class, "model", modules, parent=GemmaPreTrainedModel,
                      mixins={"causal_lm": (DecoderGeneration,)})


(FlaxGemmaPreTrainedModel, FlaxGemmaModel, FlaxGemmaForCausalLM, FlaxGemmaForSequenceClassification,
 FlaxGemmaForTokenClassification) = _family("Gemma", GemmaConfig)
(FlaxGemma2PreTrainedModel, FlaxGemma2Model, FlaxGemma2ForCausalLM,
 FlaxGemma2ForSequenceClassification, FlaxGemma2ForTokenClassification) = _family("Gemma2", Gemma2Config)
# Gemma 3's text-only classes: Gemma3TextModel, Gemma3ForCausalLM, Gemma3TextForSequenceClassification.
(FlaxGemma3TextPreTrainedModel, FlaxGemma3TextModel, FlaxGemma3TextForSequenceClassification) = _family(
    "Gemma3Text", Gemma3TextConfig,
    {k: MODULES[k] for k in ("Model", "ForSequenceClassification")})
FlaxGemma3ForCausalLM = model_class("FlaxGemma3ForCausalLM", FlaxGemma3TextPreTrainedModel,
                                    MODULES["ForCausalLM"], "causal_lm", (DecoderGeneration,))
