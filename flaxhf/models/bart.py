"""BART, mBART and Marian: one encoder-decoder family, switched by `config.model_type`.

mBART normalises before each sub-layer and once more after each stack; Marian has fixed sinusoidal
positions (sin in the first half of the features, cos in the second) and no embedding LayerNorm;
BART and mBART learn their positions with an offset of 2. Module and parameter names equal
transformers' PyTorch names (`model.encoder.layers.0.self_attn.q_proj.weight`).

The decoder's cache is the Linen "cache" collection: per layer, the self-attention `cached_key`,
`cached_value` [B, max_length, H, D] and a scalar `cache_index` (transformers v4's layout, from
`init_cache`). Generation also keeps each layer's cross-attention keys and values of the encoder
output there (`encoder_attn.cached_key` [B, S, H, D]), computed once in the prefill.
"""

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import BartConfig, MarianConfig, MBartConfig, PretrainedConfig

from flaxhf.models import outputs as O
from flaxhf.models.base import model_class
from flaxhf.models.decoder import cache_kv, count_positions, decoder_mask
# v4 scripts import shift_tokens_right from the model's module (flaxhf.models.marian re-exports it).
from flaxhf.models.decoder import shift_tokens_right  # noqa: F401
from flaxhf.models.seq2seq import Seq2SeqLM, Seq2SeqPreTrainedModel
from flaxhf.models.layers import (Dropout, Embedding, LayerNorm, Linear, attention_bias, constrain,
                                  dot_product_attention, get_activation, materialize_gradient,
                                  merge_heads, split_heads)

_EPS = 1e-5          # torch.nn.LayerNorm's default, which every layer norm of the family uses
_POSITION_OFFSET = 2  # BART's learned positions start at row 2 (a fairseq legacy)


def mbart_shift_tokens_right(input_ids, pad_token_id: int):
  """mBART's shift: the last non-pad token (the language code) wraps round to the front."""
  if pad_token_id is None:
    raise ValueError("self.model.config.pad_token_id has to be defined.")
  ids = jnp.asarray(input_ids)
  ids = jnp.where(ids == -100, pad_token_id, ids)
  last_B = jnp.sum(ids != pad_token_id, axis=-1) - 1
  start_B = jnp.take_along_axis(ids, last_B[:, None], axis=1)
  return jnp.concatenate([start_B, ids[:, :-1]], axis=1)


def marian_sinusoidal_init(key, shape, dtype=jnp.float32):
  """MarianSinusoidalPositionalEmbedding.create_weight: sin features first, cos in the second half."""
  del key  # a fixed table
  n_pos, dim = shape
  j = np.arange(dim)
  angle_PxD = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)
  half = (dim + 1) // 2
  table = np.empty((n_pos, dim), np.float32)
  table[:, :half] = np.sin(angle_PxD[:, 0::2])
  table[:, half:] = np.cos(angle_PxD[:, 1::2])
  return jnp.asarray(table, dtype)


@dataclasses.dataclass(frozen=True)
class Flavor:
  """What differs between the three architectures."""

  pre_norm: bool             # mBART: LayerNorm before each sub-layer, and `layer_norm` after each stack
  sinusoidal: bool           # Marian: fixed sinusoidal positions without offset
  layernorm_embedding: bool  # BART, mBART: LayerNorm on the embeddings


FLAVORS = {"bart": Flavor(False, False, True), "mbart": Flavor(True, False, True),
           "marian": Flavor(False, True, False)}


def has_shared(c) -> bool:
  """Whether the model keeps a `shared` embedding (Marian may give the decoder its own vocabulary)."""
  return c.model_type != "marian" or c.share_encoder_decoder_embeddings


def target_vocab_size(c) -> int:
  return c.decoder_vocab_size if not has_shared(c) else c.vocab_size


class BartAttention(nn.Module):
  """Multi-head attention with q/k/v/out projections; decoder self-attention keeps a KV cache."""

  config: PretrainedConfig
  num_heads: int
  causal: bool = False  # the decoder's self-attention
  cross: bool = False   # keys/values from the encoder output
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, mask, kv_BxSxE=None, deterministic=True, init_cache=False,
               cache_cross=False):
    c, d = self.config, self.dtype

    def proj(name, axes=("heads", "embed")):
      return Linear(c.d_model, axes, c.init_std, dtype=d, name=name)

    q = constrain(split_heads(proj("q_proj")(x_BxTxE), self.num_heads), ("batch", "seq", "heads", "kv"))
    if self.cross and self.has_variable("cache", "cached_key"):  # projected once, at the prefill
      k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    else:
      source = kv_BxSxE if self.cross else x_BxTxE
      k = split_heads(proj("k_proj")(source), self.num_heads)
      v = split_heads(proj("v_proj")(source), self.num_heads)
      if self.cross and cache_cross:
        self.put_variable("cache", "cached_key", k)
        self.put_variable("cache", "cached_value", v)
    if self.causal:
      k, v, first_slot = cache_kv(self, k, v, init_cache)
      mask = decoder_mask(mask, first_slot, q.shape[1])
    ctx, probs = dot_product_attention(q, k, v, attention_bias(mask, d), dropout_rate=c.attention_dropout,
                                       deterministic=deterministic, module=self, dtype=d)
    return proj("out_proj", ("embed", "heads"))(merge_heads(ctx)), probs


def _sublayer(module, x, fn, norm_name, deterministic):
  """The residual around `fn` with its LayerNorm: before `fn` (mBART) or after the sum (BART, Marian)."""
  c = module.config
  norm = LayerNorm(_EPS, dtype=module.dtype, name=norm_name)
  pre = FLAVORS[c.model_type].pre_norm
  y, extra = fn(norm(x) if pre else x)
  y = x + Dropout(c.dropout)(y, deterministic=deterministic)
  return (y if pre else norm(y)), extra


def _feed_forward(module, ffn_dim, deterministic):
  c, d = module.config, module.dtype

  def ffn(x):
    h = get_activation(c.activation_function)(
        Linear(ffn_dim, ("mlp", "embed"), c.init_std, dtype=d, name="fc1")(x))
    h = Dropout(c.activation_dropout)(h, deterministic=deterministic)
    return Linear(c.d_model, ("embed", "mlp"), c.init_std, dtype=d, name="fc2")(h), None
  return ffn


class BartEncoderLayer(nn.Module):
  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE, mask_BxL, deterministic):
    c = self.config
    attn = BartAttention(c, c.encoder_attention_heads, dtype=self.dtype, name="self_attn")
    x, probs = _sublayer(self, x_BxLxE, lambda h: attn(h, mask_BxL, deterministic=deterministic),
                         "self_attn_layer_norm", deterministic)
    x, _ = _sublayer(self, x, _feed_forward(self, c.encoder_ffn_dim, deterministic), "final_layer_norm",
                     deterministic)
    return constrain(x, ("batch", "seq", "embed")), probs


class BartDecoderLayer(nn.Module):
  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxE, mask, encoder_BxSxE, encoder_mask_BxS, deterministic, init_cache,
               cache_cross):
    c, d, h = self.config, self.dtype, self.config.decoder_attention_heads
    self_attn = BartAttention(c, h, causal=True, dtype=d, name="self_attn")
    cross_attn = BartAttention(c, h, cross=True, dtype=d, name="encoder_attn")
    x, self_probs = _sublayer(
        self, x_BxTxE, lambda y: self_attn(y, mask, deterministic=deterministic, init_cache=init_cache),
        "self_attn_layer_norm", deterministic)
    x, cross_probs = _sublayer(
        self, x, lambda y: cross_attn(y, encoder_mask_BxS, encoder_BxSxE, deterministic,
                                      cache_cross=cache_cross),
        "encoder_attn_layer_norm", deterministic)
    x, _ = _sublayer(self, x, _feed_forward(self, c.decoder_ffn_dim, deterministic), "final_layer_norm",
                     deterministic)
    return constrain(x, ("batch", "seq", "embed")), self_probs, cross_probs


def _embed(module, ids_BxL, position_ids_BxL, vocab_size, deterministic):
  """Scaled token embeddings + positions (+ layernorm_embedding), then dropout."""
  c, d = module.config, module.dtype
  flavor = FLAVORS[c.model_type]
  if position_ids_BxL is None:  # the wrappers pass them; module-level calls (init) count from 0
    position_ids_BxL = count_positions(*ids_BxL.shape)
  tokens = module.shared if module.shared is not None else Embedding(
      vocab_size, c.d_model, std=c.init_std, padding_idx=c.pad_token_id, dtype=d, name="embed_tokens")
  x = tokens(ids_BxL) * (math.sqrt(c.d_model) if c.scale_embedding else 1.0)
  if flavor.sinusoidal:  # a frozen table in transformers: no gradient
    table = Embedding(c.max_position_embeddings, c.d_model, axes=(None, "embed"),
                      embedding_init=marian_sinusoidal_init, dtype=d, name="embed_positions")
    x = x + jax.lax.stop_gradient(table(position_ids_BxL))
  else:
    x = x + Embedding(c.max_position_embeddings + _POSITION_OFFSET, c.d_model, axes=(None, "embed"),
                      std=c.init_std, dtype=d, name="embed_positions")(position_ids_BxL + _POSITION_OFFSET)
  if flavor.layernorm_embedding:
    x = LayerNorm(_EPS, dtype=d, name="layernorm_embedding")(x)
  return Dropout(c.dropout)(x, deterministic=deterministic)


def _layerdrop(module, x_old, x_new, rate, deterministic):
  """transformers' LayerDrop: in training, the whole layer is skipped with probability `rate`."""
  if deterministic or not rate:
    return x_new
  return jnp.where(jax.random.uniform(module.make_rng("dropout")) < rate, x_old, x_new)


def _final_norm(module, x):
  if FLAVORS[module.config.model_type].pre_norm:
    return LayerNorm(_EPS, dtype=module.dtype, name="layer_norm")(x)
  return x


class BartEncoder(nn.Module):
  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32
  shared: Optional[nn.Module] = None  # the tied token embedding; None: the encoder has its own

  @nn.compact
  def __call__(self, input_ids, attention_mask, position_ids, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    x = _embed(self, input_ids, position_ids, c.vocab_size, deterministic)
    hidden, attentions = (), ()
    for i in range(c.encoder_layers):
      hidden += (x,)
      y, probs = BartEncoderLayer(c, self.dtype, name=f"layers.{i}")(x, attention_mask, deterministic)
      x = materialize_gradient(_layerdrop(self, x, y, c.encoder_layerdrop, deterministic))
      attentions += (probs,)
    x = _final_norm(self, x)
    return O.BaseModelOutput(last_hidden_state=x,
                             hidden_states=hidden + (x,) if output_hidden_states else None,
                             attentions=attentions if output_attentions else None)


class BartDecoder(nn.Module):
  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32
  shared: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, input_ids, attention_mask, position_ids, encoder_hidden_states,
               encoder_attention_mask, deterministic=True, output_attentions=False,
               output_hidden_states=False, init_cache=False, cache_cross=False):
    c = self.config
    x = _embed(self, input_ids, position_ids, target_vocab_size(c), deterministic)
    hidden, self_attn, cross_attn = (), (), ()
    if encoder_hidden_states is not None:  # every layer's cross-attention adds to its gradient
      encoder_hidden_states = materialize_gradient(encoder_hidden_states)
    for i in range(c.decoder_layers):
      hidden += (x,)
      y, probs, cross = BartDecoderLayer(c, self.dtype, name=f"layers.{i}")(
          x, attention_mask, encoder_hidden_states, encoder_attention_mask, deterministic,
          init_cache, cache_cross)
      x = materialize_gradient(_layerdrop(self, x, y, c.decoder_layerdrop, deterministic))
      self_attn, cross_attn = self_attn + (probs,), cross_attn + (cross,)
    x = _final_norm(self, x)
    return O.BaseModelOutputWithPastAndCrossAttentions(
        last_hidden_state=x, hidden_states=hidden + (x,) if output_hidden_states else None,
        attentions=self_attn if output_attentions else None,
        cross_attentions=cross_attn if output_attentions else None)


class BartModule(nn.Module):
  """`BartModel` (and `MBartModel`, `MarianModel`): `shared`, `encoder`, `decoder`."""

  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.shared = Embedding(c.vocab_size, c.d_model, std=c.init_std, padding_idx=c.pad_token_id,
                            dtype=self.dtype) if has_shared(c) else None
    # Untied, transformers 5 gives the encoder and decoder their own embeddings (`shared` unused).
    tied = self.shared if c.tie_word_embeddings else None
    self.encoder = BartEncoder(c, self.dtype, shared=tied)
    self.decoder = BartDecoder(c, self.dtype, shared=tied)

  def encode(self, input_ids, attention_mask, position_ids, deterministic=True,
             output_attentions=False, output_hidden_states=False):
    return self.encoder(input_ids, attention_mask, position_ids, deterministic, output_attentions,
                        output_hidden_states)

  def decode(self, decoder_input_ids, decoder_attention_mask, decoder_position_ids,
             encoder_hidden_states, encoder_attention_mask, deterministic=True,
             output_attentions=False, output_hidden_states=False, init_cache=False, cache_cross=False):
    return self.decoder(decoder_input_ids, decoder_attention_mask, decoder_position_ids,
                        encoder_hidden_states, encoder_attention_mask, deterministic,
                        output_attentions, output_hidden_states, init_cache, cache_cross)

  def output_embeddings(self):
    """The [V, E] matrix a tied LM head projects onto: `shared`, or Marian's decoder embedding."""
    if self.shared is not None:
      return self.shared.weight
    return nn.meta.unbox(self.decoder.variables["params"]["embed_tokens"]["weight"])

  def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
               position_ids=None, decoder_position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    if self.shared is not None and not self.config.tie_word_embeddings:
      self.shared.weight  # noqa: B018 -- untied, `shared` is unused but still in the state dict
    enc = self.encode(input_ids, attention_mask, position_ids, deterministic, output_attentions,
                      output_hidden_states)
    dec = self.decode(decoder_input_ids, decoder_attention_mask, decoder_position_ids,
                      enc.last_hidden_state, attention_mask, deterministic, output_attentions,
                      output_hidden_states)
    return O.Seq2SeqModelOutput(
        last_hidden_state=dec.last_hidden_state, decoder_hidden_states=dec.hidden_states,
        decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions,
        encoder_last_hidden_state=enc.last_hidden_state, encoder_hidden_states=enc.hidden_states,
        encoder_attentions=enc.attentions)


def _seq2seq_fields(out):
  return {k: getattr(out, k) for k in ("decoder_hidden_states", "decoder_attentions",
                                       "cross_attentions", "encoder_last_hidden_state",
                                       "encoder_hidden_states", "encoder_attentions")}


class _HeadModule(nn.Module):
  """A head over `model`; encode/decode run only the part they need."""

  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.model = BartModule(self.config, self.dtype)
    self.setup_head()

  def setup_head(self):
    pass

  def encode(self, *args, **kwargs):
    return self.model.encode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    return self.model.decode(*args, **kwargs)


class BartForConditionalGenerationModule(_HeadModule):
  """LM logits: the tied embedding (or `lm_head`) plus the frozen `final_logits_bias` buffer."""

  task = "seq2seq_lm"

  def setup_head(self):
    c, vocab = self.config, target_vocab_size(self.config)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(vocab, ("vocab", "embed"), c.init_std, use_bias=False, dtype=self.dtype)
    self.final_logits_bias = self.param(
        "final_logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, "vocab")),
        (1, vocab), jnp.float32)

  def lm_logits(self, x_BxTxE):
    if self.config.tie_word_embeddings:
      logits = jnp.einsum("bte,ve->btv", x_BxTxE, self.model.output_embeddings().astype(self.dtype))
    else:
      logits = self.lm_head(x_BxTxE)
    # A buffer in transformers: added, never trained.
    return (logits + jax.lax.stop_gradient(self.final_logits_bias).astype(self.dtype)).astype(jnp.float32)

  def decode(self, *args, **kwargs):
    out = self.model.decode(*args, **kwargs)
    return O.CausalLMOutputWithCrossAttentions(
        logits=self.lm_logits(out.last_hidden_state), hidden_states=out.hidden_states,
        attentions=out.attentions, cross_attentions=out.cross_attentions)

  def generation_prefill(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                         decoder_position_ids):
    """Encodes once, caches every layer's cross-attention keys/values, runs the decoder prompt."""
    enc = self.model.encode(input_ids, attention_mask, None)
    return self.decode(decoder_input_ids, decoder_attention_mask, decoder_position_ids,
                       enc.last_hidden_state, attention_mask, cache_cross=True)

  def __call__(self, *args, **kwargs):
    out = self.model(*args, **kwargs)
    return O.Seq2SeqLMOutput(logits=self.lm_logits(out.last_hidden_state), **_seq2seq_fields(out))


class BartClassificationHead(nn.Module):
  """dropout -> dense -> tanh -> dropout -> out_proj, on the last EOS token's decoder state."""

  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxE, deterministic):
    c = self.config
    drop = Dropout(c.classifier_dropout or 0.0)
    x = drop(x_BxE, deterministic=deterministic)
    x = jnp.tanh(Linear(c.d_model, (None, "embed"), c.init_std, dtype=self.dtype, name="dense")(x))
    x = drop(x, deterministic=deterministic)
    return Linear(c.num_labels, ("classes", "embed"), c.init_std, dtype=self.dtype, name="out_proj")(x)


def last_eos_index(input_ids_BxL, eos_token_id):
  """Each row's last EOS position (rows are checked to hold the same number of EOS beforehand)."""
  return jnp.argmax(jnp.arange(input_ids_BxL.shape[-1]) * (input_ids_BxL == eos_token_id), axis=-1)


class BartForSequenceClassificationModule(_HeadModule):
  task = "sequence_classification"

  def setup_head(self):
    self.classification_head = BartClassificationHead(self.config, self.dtype)

  def __call__(self, input_ids, *args, deterministic=True, **kwargs):
    out = self.model(input_ids, *args, deterministic=deterministic, **kwargs)
    x_BxTxE = out.last_hidden_state
    pooled = x_BxTxE[jnp.arange(x_BxTxE.shape[0]), last_eos_index(input_ids, self.config.eos_token_id)]
    logits = self.classification_head(pooled, deterministic).astype(jnp.float32)
    return O.Seq2SeqSequenceClassifierOutput(logits=logits, **_seq2seq_fields(out))


class BartForQuestionAnsweringModule(_HeadModule):
  task = "question_answering"

  def setup_head(self):
    self.qa_outputs = Linear(2, ("classes", "embed"), self.config.init_std, dtype=self.dtype)

  def __call__(self, *args, **kwargs):
    out = self.model(*args, **kwargs)
    logits = self.qa_outputs(out.last_hidden_state).astype(jnp.float32)
    return O.Seq2SeqQuestionAnsweringModelOutput(start_logits=logits[..., 0],
                                                 end_logits=logits[..., 1], **_seq2seq_fields(out))


# (public-class suffix, module, task); the LM head also generates.
_HEADS = (("Model", BartModule, None), ("ForConditionalGeneration", BartForConditionalGenerationModule,
                                         "seq2seq_lm"),
          ("ForSequenceClassification", BartForSequenceClassificationModule, "sequence_classification"),
          ("ForQuestionAnswering", BartForQuestionAnsweringModule, "question_answering"))


class _BartHooks:
  """BART decodes from </s>."""

  @classmethod
  def decoder_start_from_tokenizer(cls, tokenizer, data_cfg):
    return tokenizer.eos_token_id


class _MBartHooks:
  """mBART: language codes end sources and targets; the target's code starts decoding."""

  language_codes = True

  @classmethod
  def shift_labels(cls, labels, config):
    return mbart_shift_tokens_right(labels, config.pad_token_id)

  @classmethod
  def decoder_start_from_tokenizer(cls, tokenizer, data_cfg):
    from flaxhf.data.seq2seq import mbart_codes  # late: the data package imports no model code
    return mbart_codes(data_cfg, tokenizer)[1]  # the cc25 layout: the target language code


class _MarianHooks:
  """Marian: fixed sinusoidal positions (rebuilt, never saved); no decoder inputs from input_ids."""

  decoder_inputs_from_inputs = False

  def missing_state(self, key, shape):
    if key.endswith("embed_positions.weight"):
      return np.asarray(marian_sinusoidal_init(None, shape))
    return None


def _family(arch, config_class, module_name, heads, hooks):
  """Flax{arch}PreTrainedModel, then Flax{arch}{suffix} per head, registered for the auto classes."""
  base = type(f"Flax{arch}PreTrainedModel", (hooks, Seq2SeqPreTrainedModel),
              dict(config_class=config_class, __module__=module_name))
  return (base, *(model_class(f"Flax{arch}{suffix}", base, module, task,
                              mixins=(Seq2SeqLM,) if task == "seq2seq_lm" else ())
                  for suffix, module, task in heads))


(FlaxBartPreTrainedModel, FlaxBartModel, FlaxBartForConditionalGeneration,
 FlaxBartForSequenceClassification, FlaxBartForQuestionAnswering) = _family(
     "Bart", BartConfig, __name__, _HEADS, _BartHooks)
# transformers v4 scripts import shift_tokens_right from the model's module (`model.__module__`):
# flaxhf.models.mbart and flaxhf.models.marian re-export these classes with their own.
(FlaxMBartPreTrainedModel, FlaxMBartModel, FlaxMBartForConditionalGeneration,
 FlaxMBartForSequenceClassification, FlaxMBartForQuestionAnswering) = _family(
     "MBart", MBartConfig, "flaxhf.models.mbart", _HEADS, _MBartHooks)
FlaxMarianPreTrainedModel, FlaxMarianModel, FlaxMarianMTModel = _family(
    "Marian", MarianConfig, "flaxhf.models.marian", (_HEADS[0], ("MTModel",) + _HEADS[1][1:]),
    _MarianHooks)
# transformers' MarianMTModel._keys_to_ignore_on_save: the fixed tables are rebuilt on load.
FlaxMarianMTModel.ignore_on_save = (r"^model\.(encoder|decoder)\.embed_positions\.weight$",)
