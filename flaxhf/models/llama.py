"""Llama, Mistral, Qwen2 and Qwen3: one pre-RMSNorm decoder with rotary positions, switched by the config.

What differs is a few switches (`Flavor`): Llama's `attention_bias` and `mlp_bias`, Qwen2's q/k/v
biases, Qwen3's q/k RMSNorm; and which layers attend through a sliding window (Mistral: every layer
when `sliding_window` is set; Qwen2/3: the `layer_types` that `use_sliding_window` and
`max_window_layers` make). Rotary embeddings take every `rope_type` of decoder.rope_frequencies;
attention keeps `num_key_value_heads` KV heads (GQA), and so does its static cache. Module and
parameter names equal transformers' PyTorch names (`model.layers.0.self_attn.q_proj.weight`).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from flaxhf.models import heads
from flaxhf.models.base import model_family
from flaxhf.models.decoder import (CausalLM, DecoderGeneration, DecoderHead, DecoderModule,
                                   DecoderPreTrainedModel, GQAttention, rope_parameters,
                                   rotary_cos_sin)
from flaxhf.models.layers import Embedding, LayerStack, Linear, RMSNorm, constrain, get_activation


@dataclasses.dataclass(frozen=True)
class Flavor:
  """The family's switches, read from a config."""

  qkv_bias: bool   # biases on q_proj, k_proj, v_proj
  o_bias: bool     # a bias on o_proj
  mlp_bias: bool   # biases on gate_proj, up_proj, down_proj
  qk_norm: bool    # RMSNorm over each head of q and k (Qwen3)


def flavor(c) -> Flavor:
  t = c.model_type
  if t == "llama":
    return Flavor(c.attention_bias, c.attention_bias, c.mlp_bias, False)
  if t == "mistral":
    return Flavor(False, False, False, False)
  if t == "qwen2":  # transformers' Qwen2 always has q/k/v biases and never an o_proj one
    return Flavor(True, False, False, False)
  if t == "qwen3":
    return Flavor(c.attention_bias, c.attention_bias, False, True)
  raise ValueError(f"model_type {t!r} is not a Llama-style family; flaxhf.models.llama serves "
                   "llama, mistral, qwen2, qwen3.")


def sliding_windows(c):
  """Each layer's sliding window (0: full attention), or None when no layer has one."""
  if c.model_type == "mistral":
    windows = [c.sliding_window or 0] * c.num_hidden_layers
  else:
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise ValueError(f"layer_types {unknown} are not supported by flaxhf's {c.model_type}; it "
                       "knows 'full_attention' and 'sliding_attention'.")
    windows = [(c.sliding_window or 0) if t == "sliding_attention" else 0 for t in types]
  return tuple(windows) if any(windows) else None


def check_config(c):
  """Raises naming any switch of this config that flaxhf does not implement."""
  flavor(c)
  rope_parameters(c)
  sliding_windows(c)
  get_activation(c.hidden_act)
  if c.num_attention_heads % c.num_key_value_heads:
    raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                     f"num_key_value_heads={c.num_key_value_heads}.")


class LlamaMLP(nn.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x))."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE):
    c, d, bias = self.config, self.dtype, flavor(self.config).mlp_bias

    def linear(name, features, axes, x):
      return Linear(features, axes, c.initializer_range, use_bias=bias, dtype=d, name=name)(x)

    gate = get_activation(c.hidden_act)(linear("gate_proj", c.intermediate_size, ("mlp", "embed"), x_BxTxE))
    up = linear("up_proj", c.intermediate_size, ("mlp", "embed"), x_BxTxE)
    return linear("down_proj", c.hidden_size, ("embed", "mlp"), gate * up)


class LlamaDecoderLayer(nn.Module):
  """x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x))."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, cos_sin, deterministic, output_attentions, init_cache,
               layer_idx=0):
    c, d, f = self.config, self.dtype, flavor(self.config)
    windows, window = sliding_windows(c), None
    if windows is not None:  # layer_idx is traced under scan: index a table of the windows
      window = windows[layer_idx] if isinstance(layer_idx, int) else jnp.asarray(windows)[layer_idx]
    attn = GQAttention(c, qkv_bias=f.qkv_bias, o_bias=f.o_bias, qk_norm=f.qk_norm, dtype=d,
                       name="self_attn")
    h = RMSNorm(c.rms_norm_eps, dtype=d, name="input_layernorm")(x_BxTxE)
    a, probs = attn(h, attention_mask, cos_sin, window, deterministic, output_attentions, init_cache)
    x = x_BxTxE + a
    x = x + LlamaMLP(c, d, name="mlp")(RMSNorm(c.rms_norm_eps, dtype=d, name="post_attention_layernorm")(x))
    return constrain(x, ("batch", "seq", "embed")), probs


class LlamaModule(DecoderModule):
  """The decoder (`LlamaModel`, ...): `embed_tokens`, `layers.{i}`, `norm`; rotary positions."""

  def embed(self, input_ids, position_ids, deterministic):
    c, d = self.config, self.dtype
    x = Embedding(c.vocab_size, c.hidden_size, std=c.initializer_range, padding_idx=c.pad_token_id,
                  dtype=d, name="embed_tokens")(input_ids)
    return x, (rotary_cos_sin(c, position_ids, d),)

  def layer(self, name):
    return LlamaDecoderLayer(self.config, self.dtype, name=name)

  def final_norm(self, x):
    return RMSNorm(self.config.rms_norm_eps, dtype=self.dtype, name="norm")(x)


def base_name(model_type, task):
  """The base model's attribute: `model`, but `transformer` in transformers' Llama and Qwen QA heads
  (kept there for old checkpoints)."""
  qa_transformer = task == "question_answering" and model_type in ("llama", "qwen2", "qwen3")
  return "transformer" if qa_transformer else "model"


class LlamaHead(DecoderHead):
  """The family's hooks: the decoder under `model`, its embedding `embed_tokens`, `score` heads."""

  stack: LayerStack = LayerStack()
  token_classifier = "score"

  def encoder(self):
    return LlamaModule(self.config, self.dtype, add_pooling_layer=self.pooler, stack=self.stack,
                       name=base_name(self.config.model_type, self.task))

  def embedding_path(self):
    return ("embed_tokens",)


def _head(generic):
  return type(f"Llama{generic.__name__}Module", (LlamaHead, generic), {"__module__": __name__})


# Public-class suffix -> Linen module; every family here has each head in transformers 5.
MODULES = {"Model": LlamaModule, "ForCausalLM": _head(CausalLM),
           **{"For" + h.__name__: _head(h) for h in (heads.SequenceClassification,
                                                     heads.TokenClassification,
                                                     heads.QuestionAnswering)}}


class LlamaPreTrainedModel(DecoderPreTrainedModel):
  """The Llama-style families' models: transformers v4's Flax decoder call and `generate`."""

  rotary = True

  def _build_module(self, stack):
    check_config(self.config)  # unsupported switches fail when the model is built
    super()._build_module(stack)


def _family(arch, config_class):
  classes = model_family(arch, config_class, "model", MODULES, parent=LlamaPreTrainedModel,
                         mixins={"causal_lm": (DecoderGeneration,)})
  for cls in classes[1:]:
    cls.base_model_prefix = base_name(config_class.model_type, cls.task)
  return classes


(FlaxLlamaPreTrainedModel, FlaxLlamaModel, FlaxLlamaForCausalLM, FlaxLlamaForSequenceClassification,
 FlaxLlamaForTokenClassification, FlaxLlamaForQuestionAnswering) = _family("Llama", LlamaConfig)
(FlaxMistralPreTrainedModel, FlaxMistralModel, FlaxMistralForCausalLM,
 FlaxMistralForSequenceClassification, FlaxMistralForTokenClassification,
 FlaxMistralForQuestionAnswering) = _family("Mistral", MistralConfig)
(FlaxQwen2PreTrainedModel, FlaxQwen2Model, FlaxQwen2ForCausalLM, FlaxQwen2ForSequenceClassification,
 FlaxQwen2ForTokenClassification, FlaxQwen2ForQuestionAnswering) = _family("Qwen2", Qwen2Config)
(FlaxQwen3PreTrainedModel, FlaxQwen3Model, FlaxQwen3ForCausalLM, FlaxQwen3ForSequenceClassification,
 FlaxQwen3ForTokenClassification, FlaxQwen3ForQuestionAnswering) = _family("Qwen3", Qwen3Config)
