"""The decoder shell: what every generative family shares.

The static KV cache (the Linen "cache" collection in transformers v4's layout: per attention layer
`cached_key`, `cached_value` [B, max_length, KV heads, D] and a scalar `cache_index`), positions,
causal and sliding-window masks, rotary embeddings of every `rope_type` transformers' Llama accepts,
grouped-query attention, `shift_tokens_right`, and the decoder-only model class with transformers
v4's Flax calling convention (`past_key_values=`, `init_cache`) that generation drives.
A family module supplies its blocks and names; see flaxhf/models/llama.py.
"""

import collections.abc
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxhf.generation import GenerationMixin
from flaxhf.models import heads
from flaxhf.models import outputs as O
from flaxhf.models.base import FlaxPreTrainedModel, REGISTRY, flatten, unflatten
from flaxhf.models.layers import (LayerStack, Linear, RMSNorm, attention_bias, constrain,
                                  dot_product_attention, layer_stack, materialize_gradient)


# ---- labels, positions, masks ---------------------------------------------------------------------
def shift_tokens_right(input_ids, pad_token_id: int, decoder_start_token_id: int):
  """Decoder inputs from labels: the start token, then the labels shifted right; -100 becomes pad.

  transformers v4's signature; numpy in gives numpy out (data collators), jax arrays give jax arrays.
  """
  if pad_token_id is None:
    raise ValueError("self.model.config.pad_token_id has to be defined.")
  xp = np if isinstance(input_ids, (np.ndarray, list)) else jnp
  input_ids = xp.asarray(input_ids)
  start = xp.full_like(input_ids[..., :1], decoder_start_token_id)
  shifted = xp.concatenate([start, input_ids[..., :-1]], axis=-1)
  return xp.where(shifted == -100, pad_token_id, shifted)


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


def count_positions(batch: int, length: int, first=0):
  """[B, L] positions first..first+L-1 in every row."""
  return jnp.broadcast_to(first + jnp.arange(length, dtype=jnp.int32), (batch, length))


def default_positions(attention_mask, batch: int, length: int):
  """Positions of a forward given none: transformers counts 0..L-1 whatever the padding (a
  left-padded row's first real token is not at 0); a [B, L, L] mask (packed documents, which
  transformers has no form of) restarts them per document."""
  if attention_mask is not None and attention_mask.ndim == 3:
    return positions_from_mask(attention_mask)
  return count_positions(batch, length)


def decoder_mask(attention_mask, first_slot, num_queries, sliding_window=None):
  """[B, T, S] bool: query t, at slot first_slot + t, may see key slot s <= its own that the mask allows.

  `attention_mask` is [B, S] (padding, or the cache slots in use) or [B, T, S] (per query, e.g.
  documents packed in one row). Keys past the queries are causal-masked, so cache slots not yet
  written (s >= cache_index + T) are never seen. With `sliding_window` w (> 0; may be traced) a query
  sees only the w slots ending at its own, as transformers' sliding_window_overlay counts slots.
  """
  q_slot_T = first_slot + jnp.arange(num_queries)
  k_slot_S = jnp.arange(attention_mask.shape[-1])
  allowed_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
  if sliding_window is not None:
    in_window = k_slot_S[None, :] > q_slot_T[:, None] - sliding_window
    allowed_TxS = allowed_TxS & (in_window | (sliding_window <= 0))  # <= 0: this layer has none
  allowed = attention_mask[:, None, :] if attention_mask.ndim == 2 else attention_mask
  return allowed_TxS[None] & allowed.astype(bool)


def last_token_index(input_ids_BxL, pad_token_id):
  """The sequence classifiers' token: the rightmost that is not pad_token_id (0 if none is)."""
  b, l = input_ids_BxL.shape
  if pad_token_id is None:
    if b != 1:
      raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined. Set "
                       "config.pad_token_id (e.g. to the tokenizer's pad or eos id), as transformers asks.")
    return jnp.full((b,), l - 1)
  return jnp.argmax(jnp.arange(l) * (input_ids_BxL != pad_token_id), axis=-1)


def pool_last_token(x_BxLxE, input_ids_BxL, pad_token_id):
  return x_BxLxE[jnp.arange(x_BxLxE.shape[0]), last_token_index(input_ids_BxL, pad_token_id)]


# ---- the static KV cache --------------------------------------------------------------------------
def cache_kv(module: nn.Module, k_BxTxKxD, v_BxTxKxD, init_cache: bool):
  """(keys, values, first_slot) to attend over, keeping `module`'s static KV cache.

  `init_cache` declares the cache (shapes from these k, v: [B, max_length, ...]). Once it exists,
  the T new keys/values are written at `cache_index`, which advances by T, and every slot is
  returned; the causal mask hides the slots not written yet.
  """
  decoding = module.has_variable("cache", "cached_key")
  if not (init_cache or decoding):
    return k_BxTxKxD, v_BxTxKxD, 0
  cached_k = module.variable("cache", "cached_key", jnp.zeros, k_BxTxKxD.shape, k_BxTxKxD.dtype)
  cached_v = module.variable("cache", "cached_value", jnp.zeros, v_BxTxKxD.shape, v_BxTxKxD.dtype)
  index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
  if not decoding:
    return k_BxTxKxD, v_BxTxKxD, 0
  first_slot = index.value
  at = (0, first_slot, 0, 0)
  cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BxTxKxD.astype(cached_k.value.dtype), at)
  cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BxTxKxD.astype(cached_v.value.dtype), at)
  index.value = first_slot + k_BxTxKxD.shape[1]
  return cached_k.value, cached_v.value, first_slot


# ---- rotary embeddings ----------------------------------------------------------------------------
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_parameters(config, layer_type=None) -> dict:
  """The config's rope settings as transformers 5 standardises them (`rope_type`, `rope_theta`, ...).

  `layer_type` picks one entry of a per-layer-type config (Gemma 3: "full_attention",
  "sliding_attention"). Families that rotate the whole head check `partial_rotary_factor` with
  check_whole_head_rotary.
  """
  params = dict(getattr(config, "rope_parameters", None) or {})
  if layer_type is not None:
    if layer_type not in params:
      raise ValueError(f"rope_parameters has no entry for layer type {layer_type!r}; it has "
                       f"{sorted(params)}.")
    params = dict(params[layer_type] or {})
  if not params:  # a transformers 4 config: rope_theta beside rope_scaling
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
  params.setdefault("rope_type", params.get("type", "default"))
  if params["rope_type"] not in ROPE_TYPES:
    raise ValueError(f"rope_type {params['rope_type']!r} (in the config's rope_parameters / "
                     f"rope_scaling) is not supported by flaxhf; supported: {list(ROPE_TYPES)}.")
  return params


def check_whole_head_rotary(config, layer_type=None):
  """Raises unless the config rotates every feature of a head (partial_rotary_factor 1)."""
  factor = rope_parameters(config, layer_type).get("partial_rotary_factor", 1.0)
  if factor != 1.0:
    raise ValueError(f"partial_rotary_factor={factor} is not supported by flaxhf's "
                     f"{config.model_type} (this family rotates the whole head).")


def rope_head_dim(config) -> int:
  return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _inv_freq(base, dim, xp=np):
  exponent = xp.arange(0, dim, 2).astype(xp.float32) / dim
  return (1.0 / (base ** exponent)).astype(xp.float32)


def rope_frequencies(config, seq_len=None, layer_type=None):
  """(inv_freq [R/2] float32, attention_factor): transformers' ROPE_INIT_FUNCTIONS in numpy.

  `seq_len` is max(position_ids) + 1 of a forward; only `dynamic` and `longrope` read it, and they
  take a traced jax scalar as well (their frequencies change with the sequence's length). R, the
  rotated features of a head, is head_dim * partial_rotary_factor.
  """
  p = rope_parameters(config, layer_type)
  dim = int(rope_head_dim(config) * p.get("partial_rotary_factor", 1.0))
  kind, base = p["rope_type"], p["rope_theta"]
  if kind == "default":
    return _inv_freq(base, dim), 1.0
  if kind == "linear":
    return (_inv_freq(base, dim) / np.float32(p["factor"])).astype(np.float32), 1.0
  if kind == "dynamic":
    original = _inv_freq(base, dim)
    if seq_len is None:
      return original, 1.0
    # transformers recomputes them once the sequence outgrows max_position_embeddings.
    max_pos, factor = config.max_position_embeddings, p["factor"]
    grown = jnp.maximum(jnp.asarray(seq_len), max_pos).astype(jnp.float32)
    scaled = base * ((factor * grown / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    dynamic = _inv_freq(scaled, dim, jnp)
    return jnp.where(jnp.asarray(seq_len) > max_pos, dynamic, original), 1.0
  if kind == "llama3":
    inv = _inv_freq(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  original_max = p["original_max_position_embeddings"]
  factor = p.get("factor") or config.max_position_embeddings / original_max
  attention_factor = p.get("attention_factor")
  if kind == "yarn":
    def mscale(scale, m=1.0):
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if attention_factor is None:
      m, m_all = p.get("mscale"), p.get("mscale_all_dim")
      attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
      return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = (base ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv.astype(np.float32), attention_factor
  # longrope: the short factors up to original_max_position_embeddings, the long ones beyond.
  if attention_factor is None:
    attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
  shape = np.arange(0, dim, 2).astype(np.float32) / dim
  short, long = (1.0 / (np.asarray(p[f], np.float32) * base ** shape) for f in ("short_factor", "long_factor"))
  if seq_len is None:
    return short.astype(np.float32), attention_factor
  return jnp.where(jnp.asarray(seq_len) > original_max, long, short).astype(jnp.float32), attention_factor


def rotary_cos_sin(config, position_ids_BxT, dtype, layer_type=None):
  """(cos, sin) [B, T, R] of each position, as transformers' rotary embedding gives them."""
  seq_len = jnp.max(position_ids_BxT) + 1
  inv_freq, attention_factor = rope_frequencies(config, seq_len, layer_type)
  freqs_BxTxH = position_ids_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs_BxTxH, freqs_BxTxH], axis=-1)
  return ((jnp.cos(emb) * attention_factor).astype(dtype), (jnp.sin(emb) * attention_factor).astype(dtype))


def apply_rotary(x_BxTxHxD, cos_BxTxR, sin_BxTxR):
  """Rotates the first R features of each head (all of them unless partial_rotary_factor < 1)."""
  r = cos_BxTxR.shape[-1]
  x_rot, x_pass = x_BxTxHxD[..., :r], x_BxTxHxD[..., r:]
  rotated = jnp.concatenate([-x_rot[..., r // 2:], x_rot[..., :r // 2]], axis=-1)
  y = x_rot * cos_BxTxR[:, :, None] + rotated * sin_BxTxR[:, :, None]
  return y if r == x_BxTxHxD.shape[-1] else jnp.concatenate([y, x_pass], axis=-1)


# ---- grouped-query attention ----------------------------------------------------------------------
class GQAttention(nn.Module):
  """Self-attention with `num_key_value_heads` shared KV heads and rotary positions (`q_proj`,
  `k_proj`, `v_proj`, `o_proj`); the static cache holds only the KV heads."""

  config: Any
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over each head's features of q and k, before the rotation
  dtype: jnp.dtype = jnp.float32
  unit_offset_norm: bool = False  # Gemma 3: the q/k norms scale by 1 + weight
  fused_qkv: bool = False  # Phi-3: one `qkv_proj` makes q, k and v (in that order)
  scale: Optional[float] = None  # of the logits; default head_dim ** -0.5
  softcap: Optional[float] = None  # Gemma 2's attn_logit_softcapping
  zero_unseen: bool = True  # see layers.dot_product_attention (False: transformers' eager rule)

  @nn.compact
  def __call__(self, x_BxTxE, attention_mask, cos_sin, sliding_window, deterministic,
               output_attentions, init_cache=False):
    c, d = self.config, self.dtype
    b, t, _ = x_BxTxE.shape
    dim = rope_head_dim(c)

    heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads, "v": c.num_key_value_heads}

    def linear(name, features):
      return Linear(features, ("heads", "embed"), c.initializer_range, use_bias=self.qkv_bias,
                    dtype=d, name=name)(x_BxTxE)

    if self.fused_qkv:
      qkv = linear("qkv_proj", sum(heads.values()) * dim)
      ends = [heads["q"] * dim, (heads["q"] + heads["k"]) * dim]
      flat = dict(zip("qkv", jnp.split(qkv, ends, axis=-1)))
    else:
      flat = {n: linear(f"{n}_proj", h * dim) for n, h in heads.items()}
    q, k, v = (flat[n].reshape(b, t, heads[n], dim) for n in "qkv")
    if self.qk_norm:
      q, k = (RMSNorm(c.rms_norm_eps, axis_name="kv", dtype=d, unit_offset=self.unit_offset_norm,
                      name=f"{n}_norm")(y) for n, y in (("q", q), ("k", k)))
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    q, k = materialize_gradient(q), materialize_gradient(k)
    q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
    k, v, first_slot = cache_kv(self, k, v, init_cache)
    bias = attention_bias(decoder_mask(attention_mask, first_slot, t, sliding_window), d)
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attention_dropout,
                                       deterministic=deterministic, module=self, dtype=d,
                                       scale=dim ** -0.5 if self.scale is None else self.scale,
                                       softcap=self.softcap, zero_unseen=self.zero_unseen)
    out = Linear(c.hidden_size, ("embed", "heads"), c.initializer_range, use_bias=self.o_bias,
                 dtype=d, name="o_proj")(ctx.reshape(b, t, -1))
    return out, (probs if output_attentions else None)


# ---- the base decoder ---------------------------------------------------------------------------
class DecoderModule(nn.Module):
  """A decoder-only base model (`GPT2Model`, `LlamaModel`, ...): embed, the layer stack, a final
  norm; a family fills the hooks. With add_pooling_layer, pooler_output is the last non-pad state."""

  config: Any
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = False  # only the sequence classifier reads a pooled state
  stack: LayerStack = LayerStack()
  layers_name = "layers"  # the PyTorch name of the layer list

  def embed(self, input_ids, position_ids, deterministic):
    """(x [B, T, E], extra arguments every layer takes after the attention mask)."""
    raise NotImplementedError

  def layer(self, name: str) -> nn.Module:
    """Layer `name`, called as layer(x, attention_mask, *extra, deterministic, output_attentions,
    init_cache, layer_idx=i) -> (x, attention probs)."""
    raise NotImplementedError

  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  def final_norm(self, x):
    raise NotImplementedError

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False,
               init_cache=False):
    c = self.config
    if token_type_ids is not None:
      raise ValueError(f"flaxhf's {c.model_type} takes no token_type_ids (its tokenizer does not "
                       "make them).")
    if position_ids is None:  # 0..L-1 as transformers counts them (the wrappers pass them when decoding)
      position_ids = default_positions(attention_mask, *input_ids.shape)
    embedded, extra = self.embed(input_ids, position_ids, deterministic)
    x, outs, attentions = layer_stack(
        self.layer, self.num_layers(), self.layers_name, self.stack, embedded, attention_mask, *extra,
        deterministic, output_attentions, init_cache, pass_index=True, collect=output_hidden_states)
    x = self.final_norm(x)
    # As transformers: hidden states are each layer's input, then the last state after the norm.
    hidden = (embedded,) + outs[:-1] + (x,) if output_hidden_states else None
    attentions = attentions if output_attentions else None
    if self.add_pooling_layer:
      return O.BaseModelOutputWithPooling(
          last_hidden_state=x, pooler_output=pool_last_token(x, input_ids, c.pad_token_id),
          hidden_states=hidden, attentions=attentions)
    return O.BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden, attentions=attentions)


# ---- heads ----------------------------------------------------------------------------------------
class DecoderHead(heads.Head):
  """Hooks shared by decoder-only heads: `score` on the last non-pad token, the tied LM head."""

  def classify(self, out, num_outputs, deterministic):
    # XForSequenceClassification: `score`, without bias or dropout, on the last non-pad token.
    return self.linear(num_outputs, "score", use_bias=False)(out.pooler_output)

  def classifier_dropout(self):  # transformers' token-classification rule
    c = self.config
    for name in ("classifier_dropout", "hidden_dropout"):
      if getattr(c, name, None) is not None:
        return getattr(c, name)
    return 0.1

  def qa_num_outputs(self):
    return 2  # qa_outputs is always (start, end)

  def embedding_path(self) -> tuple:
    """Where the token embedding sits in the base model's params (the tied LM head reads it)."""
    raise NotImplementedError


class CausalLM(DecoderHead):
  """`XForCausalLM` / `GPT2LMHeadModel`: logits from the tied embedding, or an untied `lm_head`;
  a config's `final_logit_softcapping` c (Gemma 2) bounds them to c * tanh(logits / c)."""

  task = "causal_lm"
  output_class = O.CausalLMOutput

  def predict(self, encoder, out, deterministic, shape):
    c, x = self.config, out.last_hidden_state
    if c.tie_word_embeddings:
      table = encoder.variables["params"]
      for name in self.embedding_path():
        table = table[name]
      table_VxE = nn.meta.unbox(table["weight"])
      logits = jnp.einsum("...e,ve->...v", x, table_VxE.astype(self.dtype))
    else:
      logits = self.linear(c.vocab_size, "lm_head", ("vocab", "embed"), use_bias=False)(x)
    cap = getattr(c, "final_logit_softcapping", None)
    return {"logits": logits if cap is None else jnp.tanh(logits / cap) * cap}


def _cache_shape(cache):
  """(batch, max_length) of a cache from init_cache, with a clear error for anything else."""
  keys = [v for k, v in flatten(cache).items() if k.endswith("cached_key")] if isinstance(
      cache, collections.abc.Mapping) else []  # a dict, or a FrozenDict from older Flax code
  if not keys:
    raise ValueError("past_key_values must be the cache from model.init_cache(batch_size, max_length) "
                     "(or a previous call's outputs.past_key_values).")
  return tuple(keys[0].shape[:2])


class DecoderPreTrainedModel(FlaxPreTrainedModel):
  """Decoder-only models with transformers v4's Flax decoder call: `past_key_values=`, `init_cache`."""

  uses_token_type_ids = False
  ignore_on_load = (r"^lm_head\.weight$",)  # the copy of the embedding that tied checkpoints carry
  rotary = False  # rotary positions: no learned table bounds the length, so generation is not capped

  def check_cache_length(self, max_length: int):
    """Raises when a cache of `max_length` slots would outrun the model's positions (learned tables)."""

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
    self.check_cache_length(max_length)
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
        mt = self.config.model_type
        raise ValueError(f"past_key_values is for {REGISTRY[None][mt].__name__} and "
                         f"{REGISTRY['causal_lm'][mt].__name__}, not {type(self).__name__}.")
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
      raise ValueError(f"{type(self).__name__} takes no token_type_ids (its tokenizer does not "
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
    return self.finish_outputs(outputs, labels, start_positions, end_positions, return_dict)


class DecoderGeneration(GenerationMixin):
  """generate() of a decoder-only LM; a scanned model decodes with its unscanned twin."""

  def _max_positions(self) -> Optional[int]:
    return None if self.rotary else super()._max_positions()

  def _cache_rebuild_at(self) -> Optional[int]:
    # transformers' Phi-3 recomputes the cache once the sequence outgrows the original length, so
    # the keys before it take the long factors too (its prepare_inputs_for_generation).
    if self.config.model_type != "phi3":
      return None
    p = rope_parameters(self.config)
    return int(p["original_max_position_embeddings"]) if p["rope_type"] == "longrope" else None

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
