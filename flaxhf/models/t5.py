"""T5, T5 v1.1 and mT5: one encoder-decoder with relative position buckets, switched by the config.

transformers' config describes every variant: `feed_forward_proj` "relu" (T5) or "gated-gelu" (v1.1,
mT5: wi_0, wi_1, wo); T5's tied head rescales the decoder output by d_model**-0.5
(`scale_decoder_outputs`), while v1.1 and mT5 read it through their own `lm_head` unscaled. Only
block 0 of each stack owns `relative_attention_bias`; the bias it computes serves every later block,
as in transformers. Parameter paths are the PyTorch state-dict keys
(`encoder.block.0.layer.0.SelfAttention.q.weight`).

The decoder cache is the Linen "cache" collection: per self-attention `cached_key`, `cached_value`
[B, max_length, H, D] and a scalar `cache_index` (the v4 layout); per cross-attention the projected
encoder states `cached_key`, `cached_value` [B, Le, H, D], written by the first decode call that is
given encoder outputs and read by every later one, so generation projects them once.
"""

import collections.abc
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import MT5Config, T5Config

from flaxhf.models import outputs as O
from flaxhf.models.base import FlaxPreTrainedModel, flatten, model_class
from flaxhf.models.decoder import cache_kv, decoder_mask
from flaxhf.models.decoder import shift_tokens_right  # noqa: F401 -- v4 scripts import it from here
from flaxhf.models.layers import (Dropout, Embedding, Linear, RMSNorm, attention_bias, constrain,
                                  dot_product_attention, get_activation, materialize_gradient,
                                  merge_heads, split_heads)
from flaxhf.models.seq2seq import EncoderDecoderGeneration, EncoderDecoderHooks


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """transformers' T5 bucket of each relative position (key minus query): exact near, log-spaced far."""
  buckets = 0
  if bidirectional:  # half the buckets for keys after the query
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    relative_position = jnp.abs(relative_position)
  else:  # keys after the query share bucket 0 (the causal mask hides them anyway)
    relative_position = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # max(., 1) keeps log finite; those positions take the exact branch.
  ratio = jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact
  large = max_exact + (jnp.log(ratio) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, relative_position, large)


def scales_decoder_output(config) -> bool:
  """Original T5 multiplies the decoder output by d_model**-0.5 before its tied head; mT5 never does."""
  return config.model_type == "t5" and bool(getattr(config, "scale_decoder_outputs", True))


def has_lm_head(config) -> bool:
  """v1.1 and mT5 checkpoints carry their own `lm_head.weight`; original T5 reads `shared`."""
  # transformers 5 forces config.tie_word_embeddings=True and keeps v1.1's "untied" as
  # scale_decoder_outputs=False; a config set to tie_word_embeddings=False unties as well.
  return not scales_decoder_output(config) or not config.tie_word_embeddings


T5LayerNorm = RMSNorm  # the same norm: a scale only, statistics in float32


class T5DenseActDense(nn.Module):
  """`DenseReluDense`: wi -> act -> wo, or gated (v1.1, mT5): act(wi_0 x) * wi_1 x -> wo. No biases."""

  config: Any
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, deterministic):
    c, f = self.config, self.config.initializer_factor
    act = get_activation(c.dense_act_fn)

    def wi(name):
      return Linear(c.d_ff, ("mlp", "embed"), f * c.d_model ** -0.5, use_bias=False,
                    dtype=self.dtype, name=name)(x_BxTxD)

    h = act(wi("wi_0")) * wi("wi_1") if c.is_gated_act else act(wi("wi"))
    h = Dropout(c.dropout_rate)(h, deterministic=deterministic)
    return Linear(c.d_model, ("embed", "mlp"), f * c.d_ff ** -0.5, use_bias=False, dtype=self.dtype,
                  name="wo")(h)


class T5Attention(nn.Module):
  """T5's attention: q.k is not scaled (T5 folds 1/sqrt(d_kv) into q's init); biases carry positions."""

  config: Any
  dtype: jnp.dtype = jnp.float32

  def proj(self, name, x_BxTxD):
    c, f = self.config, self.config.initializer_factor
    std = {"q": f * (c.d_model * c.d_kv) ** -0.5, "k": f * c.d_model ** -0.5,
           "v": f * c.d_model ** -0.5}[name]
    y = Linear(c.num_heads * c.d_kv, ("heads", "embed"), std, use_bias=False, dtype=self.dtype,
               name=name)(x_BxTxD)
    return split_heads(y, c.num_heads)

  def attend(self, q, k, v, bias, deterministic):
    """(output [B, T, D], probs [B, H, T, S]) of heads q, k, v under an additive float32 bias."""
    c = self.config
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.dropout_rate,
                                       deterministic=deterministic, module=self, dtype=self.dtype,
                                       scale=1.0)
    out = Linear(c.d_model, ("embed", "heads"), c.initializer_factor * (c.num_heads * c.d_kv) ** -0.5,
                 use_bias=False, dtype=self.dtype, name="o")(merge_heads(ctx))
    return out, probs


class T5SelfAttention(T5Attention):
  """Self-attention; in the decoder causal and cached. Block 0 builds the bias the others reuse."""

  is_decoder: bool = False
  has_relative_attention_bias: bool = False

  def position_bias(self, first_slot, num_queries, num_keys):
    """[1, H, T, S]: the learned bias of query slot first_slot + t against key slot s."""
    c = self.config
    query_T = first_slot + jnp.arange(num_queries)
    relative_TxS = jnp.arange(num_keys)[None, :] - query_T[:, None]
    bucket_TxS = relative_position_bucket(
        relative_TxS, bidirectional=not self.is_decoder,
        num_buckets=c.relative_attention_num_buckets, max_distance=c.relative_attention_max_distance)
    table = Embedding(c.relative_attention_num_buckets, c.num_heads, axes=(None, "heads"),
                      std=c.initializer_factor * c.d_model ** -0.5, dtype=jnp.float32,
                      name="relative_attention_bias")
    return jnp.transpose(table(bucket_TxS), (2, 0, 1))[None]

  @nn.compact
  def __call__(self, x_BxTxD, attention_mask, bias, deterministic, init_cache=False):
    q, k, v = (self.proj(n, x_BxTxD) for n in ("q", "k", "v"))
    k, v, first_slot = cache_kv(self, k, v, init_cache)
    if bias is None:
      if not self.has_relative_attention_bias:
        raise ValueError("Only block 0 computes the position bias; later blocks must be given it.")
      # transformers adds the mask and the position bias to the scores; one sum serves every block.
      allowed = (decoder_mask(attention_mask, first_slot, q.shape[1]) if self.is_decoder
                 else attention_mask)
      bias = attention_bias(allowed, jnp.float32) + self.position_bias(first_slot, q.shape[1],
                                                                        k.shape[1])
    out, probs = self.attend(q, k, v, bias, deterministic)
    return out, bias, probs


class T5CrossAttention(T5Attention):
  """Decoder -> encoder attention; with a cache, the encoder's keys/values are projected once."""

  @nn.compact
  def __call__(self, x_BxTxD, encoder_BxSxD, bias, deterministic, init_cache=False):
    q = self.proj("q", x_BxTxD)
    cached = self.has_variable("cache", "cached_key")
    if encoder_BxSxD is None:  # decoding on: the keys/values a previous call stored
      if not cached:
        raise ValueError("Decoding without encoder outputs needs a cache that holds them: pass "
                         "encoder_outputs on the first decode call with past_key_values.")
      k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    else:
      k, v = self.proj("k", encoder_BxSxD), self.proj("v", encoder_BxSxD)
      if init_cache or cached:
        self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype).value = k
        self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype).value = v
    return self.attend(q, k, v, bias, deterministic)


class T5Block(nn.Module):
  """Pre-norm residual layers: self-attention, (decoder) cross-attention, feed-forward."""

  config: Any
  is_decoder: bool
  has_relative_attention_bias: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD, attention_mask, bias, encoder_BxSxD, encoder_bias, deterministic,
               init_cache):
    c, d = self.config, self.dtype
    drop = Dropout(c.dropout_rate)

    def norm(name):
      return T5LayerNorm(c.layer_norm_epsilon, c.initializer_factor, d, name=name)

    a, bias, probs = T5SelfAttention(c, d, is_decoder=self.is_decoder,
                                     has_relative_attention_bias=self.has_relative_attention_bias,
                                     name="layer.0.SelfAttention")(
        norm("layer.0.layer_norm")(x_BxTxD), attention_mask, bias, deterministic, init_cache)
    x = x_BxTxD + drop(a, deterministic=deterministic)
    cross_probs = None
    if self.is_decoder:
      a, cross_probs = T5CrossAttention(c, d, name="layer.1.EncDecAttention")(
          norm("layer.1.layer_norm")(x), encoder_BxSxD, encoder_bias, deterministic, init_cache)
      x = x + drop(a, deterministic=deterministic)
    ff = f"layer.{2 if self.is_decoder else 1}"
    h = T5DenseActDense(c, d, name=f"{ff}.DenseReluDense")(norm(f"{ff}.layer_norm")(x), deterministic)
    x = x + drop(h, deterministic=deterministic)
    return constrain(x, ("batch", "seq", "embed")), bias, probs, cross_probs


class T5Stack(nn.Module):
  """The encoder or the decoder over the shared embedding; hidden_states as transformers gives them."""

  config: Any
  embed_tokens: nn.Module
  is_decoder: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, encoder_hidden_states=None,
               encoder_attention_mask=None, deterministic=True, output_attentions=False,
               output_hidden_states=False, init_cache=False):
    c, d = self.config, self.dtype
    drop = Dropout(c.dropout_rate)
    x = drop(self.embed_tokens(input_ids), deterministic=deterministic)
    encoder_bias = (attention_bias(encoder_attention_mask, jnp.float32) if self.is_decoder else None)
    num_layers = c.num_decoder_layers if self.is_decoder else c.num_layers
    bias, hidden, attentions, cross = None, (), (), ()
    if encoder_hidden_states is not None:  # every block's cross-attention adds to its gradient
      encoder_hidden_states = materialize_gradient(encoder_hidden_states)
    for i in range(num_layers):
      hidden += (x,)
      x, bias, probs, cross_probs = T5Block(c, self.is_decoder, i == 0, dtype=d, name=f"block.{i}")(
          x, attention_mask, bias, encoder_hidden_states, encoder_bias, deterministic, init_cache)
      x = materialize_gradient(x)
      attentions, cross = attentions + (probs,), cross + (cross_probs,)
    x = T5LayerNorm(c.layer_norm_epsilon, c.initializer_factor, d, name="final_layer_norm")(x)
    x = drop(x, deterministic=deterministic)
    hidden += (x,)  # as transformers: the last block's output only after the final norm
    return O.BaseModelOutputWithPastAndCrossAttentions(
        last_hidden_state=x, hidden_states=hidden if output_hidden_states else None,
        attentions=attentions if output_attentions else None,
        cross_attentions=cross if output_attentions and self.is_decoder else None)


class T5EncoderModule(nn.Module):
  """`T5EncoderModel`: `shared` and `encoder`."""

  config: Any
  dtype: jnp.dtype = jnp.float32
  task = "text_encoding"  # transformers' AutoModelForTextEncoding target

  def setup(self):
    c = self.config
    self.shared = Embedding(c.vocab_size, c.d_model, std=c.initializer_factor, dtype=self.dtype)
    self.encoder = T5Stack(c, self.shared, is_decoder=False, dtype=self.dtype)

  def encode(self, input_ids, attention_mask, deterministic=True, output_attentions=False,
             output_hidden_states=False):
    out = self.encoder(input_ids, attention_mask, deterministic=deterministic,
                       output_attentions=output_attentions, output_hidden_states=output_hidden_states)
    return O.BaseModelOutput(last_hidden_state=out.last_hidden_state,
                             hidden_states=out.hidden_states, attentions=out.attentions)

  def __call__(self, input_ids, attention_mask, deterministic=True, output_attentions=False,
               output_hidden_states=False):
    return self.encode(input_ids, attention_mask, deterministic, output_attentions,
                       output_hidden_states)


class T5Module(T5EncoderModule):
  """`T5Model`: the encoder and a decoder with cross-attention, both reading `shared`."""

  task = None

  def setup(self):
    super().setup()
    self.decoder = T5Stack(self.config, self.shared, is_decoder=True, dtype=self.dtype)

  def decode(self, decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
             encoder_attention_mask, deterministic=True, output_attentions=False,
             output_hidden_states=False, init_cache=False):
    return self.decoder(decoder_input_ids, decoder_attention_mask, encoder_hidden_states,
                        encoder_attention_mask, deterministic, output_attentions,
                        output_hidden_states, init_cache)

  def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    enc = self.encode(input_ids, attention_mask, deterministic, output_attentions,
                      output_hidden_states)
    dec = self.decode(decoder_input_ids, decoder_attention_mask, enc.last_hidden_state,
                      attention_mask, deterministic, output_attentions, output_hidden_states)
    return self.seq2seq_output(enc, dec)

  def seq2seq_output(self, enc, dec):
    return O.Seq2SeqModelOutput(
        last_hidden_state=dec.last_hidden_state, decoder_hidden_states=dec.hidden_states,
        decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions,
        encoder_last_hidden_state=enc.last_hidden_state, encoder_hidden_states=enc.hidden_states,
        encoder_attentions=enc.attentions)


class T5ForConditionalGenerationModule(T5Module):
  """`T5ForConditionalGeneration`: the decoder's states projected onto the vocabulary."""

  task = "seq2seq_lm"

  def setup(self):
    super().setup()
    c = self.config
    if has_lm_head(c):
      self.lm_head = Linear(c.vocab_size, ("vocab", "embed"), c.initializer_factor, use_bias=False,
                            dtype=self.dtype)

  def decode(self, *args, **kwargs):
    dec = super().decode(*args, **kwargs)
    x = dec.last_hidden_state
    if scales_decoder_output(self.config):
      x = x * self.config.d_model ** -0.5
    logits = self.lm_head(x) if has_lm_head(self.config) else self.shared.attend(x)
    return O.CausalLMOutputWithCrossAttentions(
        logits=logits.astype(jnp.float32), hidden_states=dec.hidden_states,
        attentions=dec.attentions, cross_attentions=dec.cross_attentions)

  def seq2seq_output(self, enc, dec):
    return O.Seq2SeqLMOutput(
        logits=dec.logits, decoder_hidden_states=dec.hidden_states,
        decoder_attentions=dec.attentions, cross_attentions=dec.cross_attentions,
        encoder_last_hidden_state=enc.last_hidden_state, encoder_hidden_states=enc.hidden_states,
        encoder_attentions=enc.attentions)


def _as_ids(name, x):
  x = jnp.asarray(x, jnp.int32)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [batch, length]; got shape {tuple(x.shape)}.")
  return x


def _as_mask(name, mask, shape, what):
  if mask is None:
    return jnp.ones(shape, jnp.int32)
  mask = jnp.asarray(mask, jnp.int32)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(mask.shape)} but must be {tuple(shape)} ({what}).")
  return mask


def _encoder_states(encoder_outputs):
  """The encoder's last hidden state from encode()'s output, a v4 tuple, or the array itself."""
  if hasattr(encoder_outputs, "last_hidden_state"):
    return encoder_outputs.last_hidden_state
  if isinstance(encoder_outputs, (tuple, list)):
    return encoder_outputs[0]
  return encoder_outputs


def _cache_shapes(cache):
  """(batch, max_length, encoder length) of a cache from init_cache; a clear error otherwise."""
  flat = flatten(cache) if isinstance(cache, collections.abc.Mapping) else {}
  self_k = [v for k, v in flat.items() if k.endswith("SelfAttention.cached_key")]
  cross_k = [v for k, v in flat.items() if k.endswith("EncDecAttention.cached_key")]
  if not self_k or not cross_k:
    raise ValueError("past_key_values must be the cache from model.init_cache(batch_size, max_length, "
                     "encoder_outputs) (or a previous decode's outputs.past_key_values).")
  return self_k[0].shape[0], self_k[0].shape[1], cross_k[0].shape[1]


def decoder_start_token_id(config) -> int:
  """config.decoder_start_token_id, or an error naming the fix (transformers 5's T5Config has none)."""
  start = getattr(config, "decoder_start_token_id", None)
  if start is None:
    raise ValueError(f"This {type(config).__name__} has no decoder_start_token_id, so labels cannot "
                     "be shifted into decoder_input_ids. T5 starts decoding from the pad token: set "
                     "config.decoder_start_token_id = config.pad_token_id (released T5 checkpoints' "
                     "config.json carry decoder_start_token_id: 0), or pass decoder_input_ids.")
  return int(start)


class FlaxT5PreTrainedModel(EncoderDecoderHooks, FlaxPreTrainedModel):
  """T5 models with transformers v4's Flax seq2seq calls: __call__, encode, decode, init_cache."""

  config_class = T5Config
  base_model_prefix = "transformer"
  uses_token_type_ids = False
  source_prefix_expected = True  # "translate English to German: " and the like

  @property
  def ignore_on_load(self):
    # The tied copies of `shared` transformers' state_dict lists, and a bias old checkpoints carry.
    keys = [r"^(encoder|decoder)\.embed_tokens\.weight$",
            r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"]
    if self.task != "seq2seq_lm":  # what the base and encoder-only models do not use
      keys.append(r"^lm_head\.weight$")
    if self.task == "text_encoding":
      keys.append(r"^decoder\.")
    return tuple(keys)

  def dummy_inputs(self):
    ids = jnp.zeros(self.input_shape, jnp.int32)
    inputs = dict(input_ids=ids, attention_mask=jnp.ones_like(ids))
    if self.task != "text_encoding":
      inputs.update(decoder_input_ids=ids, decoder_attention_mask=jnp.ones_like(ids))
    return inputs

  def _params_from_state_dict(self, state, **kwargs):
    state = dict(state)
    head, shared = state.get("lm_head.weight"), state.get("shared.weight")
    if self.task == "seq2seq_lm" and shared is not None:
      if has_lm_head(self.config) and head is None:
        state["lm_head.weight"] = shared  # transformers ties a head the checkpoint does not carry
      elif not has_lm_head(self.config) and head is not None:
        if not np.array_equal(np.asarray(head), np.asarray(shared)):
          raise ValueError(
              "The checkpoint's lm_head.weight differs from shared.weight, but this config ties them "
              "(original T5, scale_decoder_outputs=True). To keep its own head, as transformers "
              "does, load with config.tie_word_embeddings = False.")
        del state["lm_head.weight"]  # the tied copy
    return super()._params_from_state_dict(state, **kwargs)

  def export_config(self):
    config = super().export_config()
    if has_lm_head(self.config):  # as v1.1 / mT5 checkpoints say it; transformers 4 reads this flag
      config.tie_word_embeddings = False
    return config

  # ---- calling -----------------------------------------------------------------------------------
  def _run(self, params, dropout_rng, train, method, cache=None, **inputs):
    if train and dropout_rng is None:
      raise ValueError("train=True applies dropout and needs dropout_rng=jax.random.key(...).")
    variables = {"params": self.params if params is None else params}
    if cache is not None:
      variables["cache"] = cache
    out = self.module.apply(variables, **inputs, deterministic=not train, method=method,
                            rngs={"dropout": dropout_rng} if train else {},
                            mutable=["cache"] if cache is not None else False)
    if cache is not None:
      out, mutated = out
      out = out.replace(past_key_values=mutated["cache"])
    return out

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, params=None, dropout_rng=None, train: bool = False,
               output_attentions=None, output_hidden_states=None, return_dict=None, labels=None):
    input_ids = _as_ids("input_ids", input_ids)
    attention_mask = _as_mask("attention_mask", attention_mask, input_ids.shape, "that of input_ids")
    flags = dict(output_attentions=bool(output_attentions),
                 output_hidden_states=bool(output_hidden_states))
    if self.task == "text_encoding":
      if decoder_input_ids is not None or labels is not None:
        raise ValueError(f"{type(self).__name__} is the encoder alone: it takes no decoder_input_ids "
                         "or labels (use FlaxT5ForConditionalGeneration).")
      out = self._run(params, dropout_rng, train, None, input_ids=input_ids,
                      attention_mask=attention_mask, **flags)
      return out.to_tuple() if return_dict is False else out
    if labels is not None:
      if self.task != "seq2seq_lm":
        raise ValueError(f"{type(self).__name__} has no loss; labels= applies to "
                         "FlaxT5ForConditionalGeneration.")
      labels = _as_ids("labels", labels)
      if decoder_input_ids is None:
        decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id,
                                               decoder_start_token_id(self.config))
    if decoder_input_ids is None:
      raise ValueError(f"{type(self).__name__} needs decoder_input_ids (T5 starts them with the pad "
                       "token: shift_tokens_right(labels, pad_token_id, decoder_start_token_id))"
                       + (", or labels." if self.task == "seq2seq_lm" else "."))
    decoder_input_ids = _as_ids("decoder_input_ids", decoder_input_ids)
    if decoder_input_ids.shape[0] != input_ids.shape[0]:
      raise ValueError(f"decoder_input_ids has batch {decoder_input_ids.shape[0]} but input_ids has "
                       f"{input_ids.shape[0]}; they must match.")
    decoder_attention_mask = _as_mask("decoder_attention_mask", decoder_attention_mask,
                                      decoder_input_ids.shape, "that of decoder_input_ids")
    out = self._run(params, dropout_rng, train, None, input_ids=input_ids,
                    attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask, **flags)
    return self.finish_outputs(out, labels, return_dict=return_dict)

  def encode(self, input_ids, attention_mask=None, output_attentions=None, output_hidden_states=None,
             return_dict=None, train: bool = False, params=None, dropout_rng=None):
    """The encoder's outputs (v4 `encode`), for `decode` and `init_cache`."""
    input_ids = _as_ids("input_ids", input_ids)
    attention_mask = _as_mask("attention_mask", attention_mask, input_ids.shape, "that of input_ids")
    out = self._run(params, dropout_rng, train, "encode", input_ids=input_ids,
                    attention_mask=attention_mask, output_attentions=bool(output_attentions),
                    output_hidden_states=bool(output_hidden_states))
    return out.to_tuple() if return_dict is False else out

  def decode(self, decoder_input_ids, encoder_outputs, encoder_attention_mask=None,
             decoder_attention_mask=None, past_key_values=None, output_attentions=None,
             output_hidden_states=None, return_dict=None, train: bool = False, params=None,
             dropout_rng=None):
    """The decoder over encoded inputs (v4 `decode`); with past_key_values, the updated cache too.

    With a cache, decoder_attention_mask covers its max_length slots, and encoder_outputs may be
    None once a call has stored the encoder's keys/values in it.
    """
    if self.task == "text_encoding":
      raise ValueError(f"{type(self).__name__} has no decoder.")
    ids = _as_ids("decoder_input_ids", decoder_input_ids)
    enc = None if encoder_outputs is None else jnp.asarray(_encoder_states(encoder_outputs))
    if past_key_values is None:
      if enc is None:
        raise ValueError("decode needs encoder_outputs (from model.encode) unless past_key_values "
                         "already hold them.")
      enc_shape = enc.shape[:2]
      dec_mask = _as_mask("decoder_attention_mask", decoder_attention_mask, ids.shape,
                          "that of decoder_input_ids")
    else:
      batch, max_length, enc_len = _cache_shapes(past_key_values)
      enc_shape = (batch, enc_len)
      if ids.shape[0] != batch or (enc is not None and enc.shape[:2] != enc_shape):
        raise ValueError(f"The cache is for batch {batch} and {enc_len} encoder positions; got "
                         f"decoder_input_ids {tuple(ids.shape)} and encoder states "
                         f"{None if enc is None else tuple(enc.shape)}.")
      dec_mask = _as_mask("decoder_attention_mask", decoder_attention_mask, (batch, max_length),
                          "[batch, max_length]: every cache slot, with past_key_values")
    if enc is not None and enc.shape[0] != ids.shape[0]:
      raise ValueError(f"encoder_outputs have batch {enc.shape[0]} but decoder_input_ids "
                       f"{ids.shape[0]}; they must match.")
    enc_mask = _as_mask("encoder_attention_mask", encoder_attention_mask, enc_shape,
                        "[batch, encoder length]")
    out = self._run(params, dropout_rng, train, "decode", cache=past_key_values,
                    decoder_input_ids=ids, decoder_attention_mask=dec_mask,
                    encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                    output_attentions=bool(output_attentions),
                    output_hidden_states=bool(output_hidden_states))
    return out.to_tuple() if return_dict is False else out

  def init_cache(self, batch_size: int, max_length: int, encoder_outputs):
    """A zero cache of `max_length` decoder slots for these encoder outputs (shapes only: no params)."""
    enc = _encoder_states(encoder_outputs)
    if enc.shape[0] != batch_size:
      raise ValueError(f"encoder_outputs have batch {enc.shape[0]}, not batch_size={batch_size}.")
    enc_spec = jax.ShapeDtypeStruct(enc.shape, self.dtype)

    def init():
      ids = jnp.ones((batch_size, max_length), jnp.int32)
      states = jnp.zeros(enc_spec.shape, enc_spec.dtype)
      return self.module.init(jax.random.key(0), ids, jnp.ones_like(ids), states,
                              jnp.ones(enc.shape[:2], jnp.int32), init_cache=True,
                              method="decode")["cache"]

    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


class T5Generation(EncoderDecoderGeneration):
  """`generate` for the LM heads: the encoder and every cross-attention projection run once."""

  def _max_positions(self):
    return None  # relative positions: no learned table bounds the decoder

  def max_encoder_positions(self):
    return None

  def _generation_prefill(self, params, ids_NxP, mask_NxP, cache_len, inputs):
    enc_mask = inputs["attention_mask"]
    encoded = self.encode(inputs["input_ids"], enc_mask, params=params)
    n, p = ids_NxP.shape
    mask_NxS = jnp.ones((n, cache_len), jnp.int32).at[:, :p].set(mask_NxP)
    out = self.decode(ids_NxP, encoded, encoder_attention_mask=enc_mask,
                      decoder_attention_mask=mask_NxS, params=params,
                      past_key_values=self.init_cache(n, cache_len, encoded))
    # The encoder states are dropped: each layer's cross keys/values now live in the cache.
    state = {"cache": out.past_key_values, "mask": mask_NxS, "encoder_mask": enc_mask}
    return out.logits[:, -1], state


class FlaxMT5PreTrainedModel(FlaxT5PreTrainedModel):
  """mT5: T5 v1.1's code under MT5Config (its own lm_head, never rescaled)."""

  config_class = MT5Config


def _declare(arch, base):
  return (model_class(f"Flax{arch}Model", base, T5Module, None),
          model_class(f"Flax{arch}ForConditionalGeneration", base, T5ForConditionalGenerationModule,
                      "seq2seq_lm", (T5Generation,)),
          model_class(f"Flax{arch}EncoderModel", base, T5EncoderModule, "text_encoding"))


FlaxT5Model, FlaxT5ForConditionalGeneration, FlaxT5EncoderModel = _declare("T5", FlaxT5PreTrainedModel)
FlaxMT5Model, FlaxMT5ForConditionalGeneration, FlaxMT5EncoderModel = _declare(
    "MT5", FlaxMT5PreTrainedModel)
