"""Llama, Mistral, Qwen2, Qwen3 and Phi-3: one pre-RMSNorm decoder with rotary positions, switched
by the config.

What differs is a few switches (`Flavor`): Llama's `attention_bias` and `mlp_bias`, Qwen2's q/k/v
biases, Qwen3's q/k RMSNorm, Phi-3's fused `qkv_proj` and `gate_up_proj` (kept fused, as the
PyTorch keys are, and split inside the modules), its partial rotary factor and residual dropout;
and which layers attend through a sliding window (Mistral, Phi-3: every layer when
`sliding_window` is set; Qwen2/3: the `layer_types` that `use_sliding_window` and
`max_window_layers` make). Rotary embeddings take every `rope_type` of decoder.rope_frequencies;
attention keeps `num_key_value_heads` KV heads (GQA), and so does its static cache. Module and
parameter names equal transformers' PyTorch names (`model.layers.0.self_attn.q_proj.weight`).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from flaxhf.models import heads
from flaxhf.models.base import model_family
from flaxhf.models.decoder import (CausalLM, DecoderGeneration, DecoderHead, DecoderModule,
                                   DecoderPreTrainedModel, GQAttention, check_whole_head_rotary,
                                   rope_parameters, rotary_cos_sin)
from flaxhf.models.layers import (Dropout, Embedding, LayerStack, Linear, RMSNorm, constrain,
                                  get_activation, materialize_gradient)


@dataclasses.dataclass(frozen=True)
class Flavor:
  """The family's switches, read from a config."""

  qkv_bias: bool   # biases on q_proj, k_proj, v_proj
  o_bias: bool     # a bias on o_proj
  mlp_bias: bool   # biases on gate_proj, up_proj, down_proj
  qk_norm: bool    # RMSNorm over each head of q and k (Qwen3)
  fused: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
  partial_rotary: bool = False  # may rotate only partial_rotary_factor of each head (Phi-3)


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
  if t == "phi3":
    return Flavor(False, False, False, False, fused=True, partial_rotary=True)
  raise ValueError(f"model_type {t!r} is not a Llama-style family; flaxhf.models.llama serves "
                   "llama, mistral, qwen2, qwen3, phi3.")


def sliding_windows(c):
  """Each layer's sliding window (0: full attention), or None when no layer has one."""
  if c.model_type in ("mistral", "phi3"):  # no layer_types: sliding_window holds for every layer
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
  if not flavor(c).partial_rotary:
    check_whole_head_rotary(c)
  rope_parameters(c)
  sliding_windows(c)
  get_activation(c.hidden_act)
  if c.num_attention_heads % c.num_key_value_heads:
    raise ValueError(f"num_attention_heads={c.num_attention_heads} is not a multiple of "
                     f"num_key_value_heads={c.num_key_value_heads}.")


class LlamaMLP(nn.Module):
  """down_proj(act(gate_proj(x)) * up_proj(x)); fused, gate and up are the halves of gate_up_proj."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  activation: str = "silu"  # transformers' ACT2FN name (config.hidden_act, Gemma's hidden_activation)
  use_bias: bool = False
  fused: bool = False

  @nn.compact
  def __call__(self, x_BxTxE):
    c, d, m = self.config, self.dtype, self.config.intermediate_size

    def linear(name, features, axes, x):
      return Linear(features, axes, c.initializer_range, use_bias=self.use_bias, dtype=d, name=name)(x)

    if self.fused:
      gate, up = jnp.split(linear("gate_up_proj", 2 * m, ("mlp", "embed"), x_BxTxE), 2, axis=-1)
    else:
      gate = linear("gate_proj", m, ("mlp", "embed"), x_BxTxE)
      up = linear("up_proj", m, ("mlp", "embed"), x_BxTxE)
    gate, up = materialize_gradient(gate), materialize_gradient(up)
    return linear("down_proj", c.hidden_size, ("embed", "mlp"), get_activation(self.activation)(gate) * up)


def per_layer(table, layer_idx):
  """This layer's entry of a per-layer table (None: no table); layer_idx is traced under scan, so
  the table becomes an array indexed by it."""
  if table is None:
    return None
  return table[layer_idx] if isinstance(layer_idx, int) else jnp.asarray(table)[layer_idx]


class LlamaDecoderLayer(nn.Module):
  """x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)) (Phi-3: each branch
  through resid_pdrop dropout)."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, cos_sin, deterministic, output_attentions, init_cache,
               layer_idx=0):
    c, d, f = self.config, self.dtype, flavor(self.config)
    window = per_layer(sliding_windows(c), layer_idx)
    attn = GQAttention(c, qkv_bias=f.qkv_bias, o_bias=f.o_bias, qk_norm=f.qk_norm, dtype=d,
                       fused_qkv=f.fused, name="self_attn")
    mlp = LlamaMLP(c, d, c.hidden_act, f.mlp_bias, f.fused, name="mlp")
    resid_dropout = Dropout(getattr(c, "resid_pdrop", 0.0))
    h = RMSNorm(c.rms_norm_eps, dtype=d, name="input_layernorm")(x_BxTxE)
    a, probs = attn(h, attention_mask, cos_sin, window, deterministic, output_attentions, init_cache)
    x = x_BxTxE + resid_dropout(a, deterministic=deterministic)
    h = mlp(RMSNorm(c.rms_norm_eps, dtype=d, name="post_attention_layernorm")(x))
    x = x + resid_dropout(h, deterministic=deterministic)
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


# Public-class suffix -> Linen module: the heads transformers 5 has (Phi-3: no QuestionAnswering).
MODULES = {"Model": LlamaModule, "ForCausalLM": _head(CausalLM),
           **{"For" + h.__name__: _head(h) for h in (heads.SequenceClassification,
                                                     heads.TokenClassification,
                                                     heads.QuestionAnswering)}}
NO_QA = {k: v for k, v in MODULES.items() if k != "ForQuestionAnswering"}


class LlamaPreTrainedModel(DecoderPreTrainedModel):
  """The Llama-style families' models: transformers v4's Flax decoder call and `generate`."""

  rotary = True
  check_config = staticmethod(check_config)

  def _build_module(self, stack):
    self.check_config(self.config)  # unsupported switches fail when the model is built
    super()._build_module(stack)


def _family(arch, config_class, modules=MODULES):
  classes = model_family(arch, config_class, "model", modules, parent=LlamaPreTrainedModel,
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
(FlaxPhi3PreTrainedModel, FlaxPhi3Model, FlaxPhi3ForCausalLM, FlaxPhi3ForSequenceClassification,
 FlaxPhi3ForTokenClassification) = _family("Phi3", Phi3Config, NO_QA)
