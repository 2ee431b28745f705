"""Logits processors: transformers' `_get_logits_processor` chain as pure functions of step state.

`build(generation_config, ...)` returns `(spec, values)`: `spec` (hashable, a static jit argument)
says which processors are on; `values` (a pytree of arrays, traced) holds every number they use:
penalties, temperature, top-k/p, min-p, lengths, token ids. Changing a value therefore never
recompiles the decode loop. `apply(spec, values, logits_NxV, sequences_NxS, cur_len)` runs the chain
in transformers' order:

  repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length / min_new_tokens,
  forced_bos_token_id, forced_eos_token_id, suppress_tokens, begin_suppress_tokens,
  and with do_sample: temperature, top_k, top_p, min_p.

The step state is what the decode loop holds: `sequences_NxS`, the prompt in slots [0, P) and the
generated tokens after it (slots from `cur_len` on are ignored), and `cur_len`, the number of filled
slots (transformers' `input_ids.shape[-1]`). Repetition penalty and the sampling warpers are always
on (penalty 1, temperature 1, top_k = vocab, top_p = 1, min_p = 0 leave logits bit-for-bit
unchanged), so turning them on or off is also only a value change.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Settings transformers applies to the logits that flaxhf does not implement: name -> (is it on?,
# the transformers processor it would add). `do_sample`-only warpers take the sampling flag.
_UNSUPPORTED = {
    "guidance_scale": (lambda v, s: v is not None and v != 1, "classifier-free guidance"),
    "sequence_bias": (lambda v, s: v is not None, "SequenceBiasLogitsProcessor"),
    "encoder_repetition_penalty": (lambda v, s: v is not None and v != 1.0,
                                   "EncoderRepetitionPenaltyLogitsProcessor"),
    "encoder_no_repeat_ngram_size": (lambda v, s: v is not None and v > 0,
                                     "EncoderNoRepeatNGramLogitsProcessor"),
    "remove_invalid_values": (lambda v, s: v is True, "InfNanRemoveLogitsProcessor"),
    "exponential_decay_length_penalty": (lambda v, s: v is not None, "ExponentialDecayLengthPenalty"),
    "top_h": (lambda v, s: s and v is not None, "TopHLogitsWarper"),
    "typical_p": (lambda v, s: s and v is not None and v < 1.0, "TypicalLogitsWarper"),
    "epsilon_cutoff": (lambda v, s: s and v is not None and 0.0 < v < 1.0, "EpsilonLogitsWarper"),
    "eta_cutoff": (lambda v, s: s and v is not None and 0.0 < v < 1.0, "EtaLogitsWarper"),
    "watermarking_config": (lambda v, s: v is not None, "a watermarking processor"),
    "renormalize_logits": (lambda v, s: v is True, "LogitNormalization"),
}
# generate() arguments that add processors or criteria flaxhf cannot compile into its loop.
_UNSUPPORTED_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                     "negative_prompt_ids", "negative_prompt_attention_mask")
SUPPORTED = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
             "min_new_tokens", "eos_token_id", "forced_bos_token_id", "forced_eos_token_id",
             "suppress_tokens", "begin_suppress_tokens", "temperature", "top_k", "top_p", "min_p")


def check_supported(generation_config, *, do_sample: Optional[bool] = None, **generate_args):
  """Raises a ValueError naming every logits setting (or generate argument) flaxhf lacks."""
  sample = bool(generation_config.do_sample if do_sample is None else do_sample)
  bad = [f"{name}={getattr(generation_config, name, None)!r} ({what})"
         for name, (on, what) in _UNSUPPORTED.items() if on(getattr(generation_config, name, None), sample)]
  for name, value in generate_args.items():
    if name not in _UNSUPPORTED_ARGS:
      raise TypeError(f"check_supported() got an unexpected argument {name!r}.")
    if value is not None and not (isinstance(value, list) and len(value) == 0):
      bad.append(f"{name}= (custom objects cannot be compiled into the decode loop)")
  if bad:
    raise ValueError("Unsupported generation settings for flaxhf: " + "; ".join(bad) +
                     ". Unset them (or use their default value); the supported logits settings are "
                     + ", ".join(SUPPORTED) + ".")


@dataclasses.dataclass(frozen=True)
class Spec:
  """Which processors are on: the static structure of the chain (hashable)."""

  no_repeat_ngram_size: int = 0
  bad_words: bool = False
  min_length: bool = False
  forced_bos: bool = False
  forced_eos: bool = False
  suppress: bool = False
  begin_suppress: bool = False
  sample: bool = False
  min_tokens_to_keep: int = 1  # with sampling: 1, or len(eos) + 1 in beam sampling


def _token_ids(name, ids, vocab_size, *, allow_outside=True):
  """int32 ids as a list; ids outside the vocabulary map to `vocab_size`, a column that is cut off."""
  ids = [ids] if isinstance(ids, (int, np.integer)) else list(ids)
  if any(not isinstance(i, (int, np.integer)) for i in ids):
    raise ValueError(f"`{name}` must be token ids (ints), got {ids!r}.")
  outside = [int(i) for i in ids if not 0 <= i < vocab_size]
  if outside and not allow_outside:
    raise ValueError(f"`{name}` has ids {outside} outside the vocabulary [0, {vocab_size}); "
                     "use ids of this model's vocabulary.")
  return np.asarray([i if 0 <= i < vocab_size else vocab_size for i in ids], np.int32)


def _bad_word_groups(bad_words_ids, eos_ids, vocab_size):
  """Banned sequences grouped by prefix length: a tuple of (prefixes_KxM, last_K) arrays."""
  if (not isinstance(bad_words_ids, list) or not bad_words_ids
      or any(not isinstance(w, list) for w in bad_words_ids)):
    raise ValueError(f"`bad_words_ids` has to be a non-empty list of lists of token ids, "
                     f"but is {bad_words_ids!r}.")
  words = []
  for w in bad_words_ids:
    if not w or any(not isinstance(t, (int, np.integer)) or t < 0 for t in w):
      raise ValueError(f"Each list in `bad_words_ids` has to be a non-empty list of non-negative "
                       f"token ids, but is {bad_words_ids!r}.")
    outside = [int(t) for t in w if t >= vocab_size]
    if outside:
      raise ValueError(f"`bad_words_ids` has ids {outside} outside the vocabulary [0, {vocab_size}).")
    # As transformers: a lone EOS is never banned (it would make generation unstoppable).
    if not (len(w) == 1 and int(w[0]) in eos_ids) and tuple(w) not in words:
      words.append(tuple(int(t) for t in w))
  if not words:
    raise ValueError(f"`bad_words_ids`={bad_words_ids!r} only bans EOS tokens, which transformers "
                     "refuses (it would never stop); remove them.")
  groups = {}
  for w in words:
    groups.setdefault(len(w) - 1, []).append(w)
  return tuple((np.asarray([w[:-1] for w in g], np.int32).reshape(len(g), m),
                np.asarray([w[-1] for w in g], np.int32)) for m, g in sorted(groups.items()))


def build(generation_config, *, prompt_len: int, vocab_size: int, do_sample: Optional[bool] = None,
          num_beams: Optional[int] = None, attention_mask=None, is_encoder_decoder: bool = False):
  """(spec, values) for `apply`, from the config exactly as `_get_logits_processor` receives it.

  The config is the one transformers' `generate` prepared: defaults merged and max_length /
  min_length resolved from the prompt (`prompt_len` = P, the decoder prompt's length for
  encoder-decoders). `attention_mask` [N, P] (one row per logits row, i.e. already repeated per
  beam or returned sequence; the decoder mask for encoder-decoders) makes the repetition penalty
  skip left padding, as transformers does; None counts every prompt slot.
  """
  gc = generation_config
  do_sample = bool(gc.do_sample) if do_sample is None else bool(do_sample)
  check_supported(gc, do_sample=do_sample)
  num_beams = (gc.num_beams or 1) if num_beams is None else num_beams
  eos_given = [] if gc.eos_token_id is None else np.asarray(gc.eos_token_id).reshape(-1).tolist()
  eos = _token_ids("eos_token_id", eos_given, vocab_size)
  f32, i32 = np.float32, np.int32
  spec = {}
  values = {}

  penalty = gc.repetition_penalty
  if penalty is not None and penalty != 1.0 and not penalty > 0:
    raise ValueError(f"`repetition_penalty` has to be a strictly positive float, but is {penalty}.")
  values["repetition_penalty"] = f32(1.0 if penalty is None else penalty)
  if attention_mask is None:
    values["prompt_pad_len"] = i32(0)
  else:
    mask = attention_mask  # a tracer inside jit/pmap; otherwise host arrays
    if not isinstance(mask, jax.core.Tracer):
      mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[1] != prompt_len:
      raise ValueError(f"attention_mask must be [rows, prompt_len={prompt_len}], got {mask.shape}.")
    # transformers' prompt_ignore_length: the slots before each row's first unmasked one.
    values["prompt_pad_len"] = (mask != 0).argmax(axis=1).astype(i32)

  n = gc.no_repeat_ngram_size
  if n is not None and n > 0:
    if not isinstance(n, (int, np.integer)):
      raise ValueError(f"`no_repeat_ngram_size` has to be a positive integer, but is {n!r}.")
    spec["no_repeat_ngram_size"] = int(n)

  values["bad_words"] = ()
  if gc.bad_words_ids is not None:
    spec["bad_words"] = True
    values["bad_words"] = _bad_word_groups(gc.bad_words_ids, set(eos_given), vocab_size)

  # MinLength and MinNewTokens are adjacent in the chain and both only ban EOS: one threshold.
  min_len = 0
  if len(eos):
    for name, value, offset in (("min_length", gc.min_length, 0),
                                ("min_new_tokens", gc.min_new_tokens, prompt_len)):
      if value is not None and value > 0:
        if not isinstance(value, (int, np.integer)):
          raise ValueError(f"`{name}` has to be a non-negative integer, but is {value!r}.")
        min_len = max(min_len, int(value) + offset)
    spec["min_length"] = True
  values["min_length"] = i32(min_len)  # EOS is banned while cur_len < this
  values["eos_ids"] = np.asarray(eos, i32).reshape(-1)

  values["forced_bos_id"] = i32(0)
  if gc.forced_bos_token_id is not None:
    spec["forced_bos"] = True
    values["forced_bos_id"] = _token_ids("forced_bos_token_id", gc.forced_bos_token_id, vocab_size,
                                         allow_outside=False)[0]
  values["forced_eos_ids"] = np.zeros((0,), i32)
  values["max_length"] = i32(gc.max_length if gc.max_length is not None else 0)
  if gc.forced_eos_token_id is not None:
    if gc.max_length is None:
      raise ValueError("`forced_eos_token_id` needs `max_length` (the resolved total length).")
    spec["forced_eos"] = True
    values["forced_eos_ids"] = _token_ids("forced_eos_token_id", gc.forced_eos_token_id, vocab_size,
                                          allow_outside=False)
  values["suppress_ids"] = np.zeros((0,), i32)
  if gc.suppress_tokens is not None:
    spec["suppress"] = True
    values["suppress_ids"] = _token_ids("suppress_tokens", gc.suppress_tokens, vocab_size)
  values["begin_suppress_ids"] = np.zeros((0,), i32)
  # transformers: the first generated slot, one later when a forced BOS takes a 1-token prompt's.
  begin = prompt_len if (prompt_len > 1 or gc.forced_bos_token_id is None) else prompt_len + 1
  values["begin_index"] = i32(begin)
  if gc.begin_suppress_tokens is not None:
    spec["begin_suppress"] = True
    values["begin_suppress_ids"] = _token_ids("begin_suppress_tokens", gc.begin_suppress_tokens,
                                              vocab_size)

  warpers, keep = _warper_values(gc, do_sample, num_beams, len(eos), vocab_size)
  values.update(warpers)
  if do_sample:
    spec.update(sample=True, min_tokens_to_keep=keep)
  del is_encoder_decoder  # the caller picks the matching mask; nothing else differs here
  return Spec(**spec), jax.tree.map(jnp.asarray, values)


def _warper_values(gc, do_sample, num_beams, num_eos, vocab_size):
  """(temperature, top-k, top-p, min-p as values whose neutral settings change nothing,
  min_tokens_to_keep)."""
  # Beam sampling keeps one non-EOS continuation per beam beyond the EOS ids (transformers).
  keep = min(num_eos + 1 if num_beams > 1 and num_eos else (2 if num_beams > 1 else 1), vocab_size)
  t, k, p, min_p = gc.temperature, gc.top_k, gc.top_p, gc.min_p
  if do_sample:
    if t is not None and t != 1.0 and not t > 0:
      raise ValueError(f"`temperature` (={t}) has to be a strictly positive float; for greedy "
                       "decoding set do_sample=False.")
    if k is not None and k != 0 and (not isinstance(k, (int, np.integer)) or k < 0):
      raise ValueError(f"`top_k` has to be a strictly positive integer (0 turns it off), but is {k!r}.")
    if p is not None and p < 0:
      raise ValueError(f"`top_p` has to be a float in [0, 1], but is {p}.")
    if min_p is not None and not 0 <= min_p <= 1:
      raise ValueError(f"`min_p` has to be a float in the [0, 1] interval, but is {min_p}.")
  top_k = vocab_size if k is None or k == 0 else min(max(int(k), keep), vocab_size)
  # transformers compares float32 cumulative sums with the float32 rounding of (1 - top_p) taken in
  # double; 0 means off (top_p >= 1 adds no processor).
  cut = 1.0 - p if p is not None and p < 1.0 else 0.0
  return {"temperature": np.float32(1.0 if t is None else t), "top_k": np.int32(top_k),
          "top_p_cut": np.float32(cut), "min_p": np.float32(0.0 if min_p is None else min_p)}, keep


def _mask_V(ids, vocab_size):
  """[V] bool, True at `ids` (ids equal to `vocab_size` stand for ids outside the vocabulary)."""
  return jnp.zeros((vocab_size + 1,), bool).at[ids].set(True)[:vocab_size]


def repetition_penalty(scores_NxV, sequences_NxS, cur_len, penalty, pad_len):
  """Divides positive (multiplies negative) logits of every token in the sequence so far."""
  n, s = sequences_NxS.shape
  v = scores_NxV.shape[-1]
  pos_S = jnp.arange(s)
  counted_NxS = (pos_S < cur_len) & (pos_S >= jnp.reshape(pad_len, (-1, 1)))
  ids_NxS = jnp.where(counted_NxS & (sequences_NxS >= 0), jnp.minimum(sequences_NxS, v), v)
  seen_NxV = jnp.zeros((n, v + 1), bool).at[jnp.arange(n)[:, None], ids_NxS].set(True)[:, :v]
  penalized = jnp.where(scores_NxV < 0, scores_NxV * penalty, scores_NxV / penalty)
  return jnp.where(seen_NxV, penalized, scores_NxV)


def no_repeat_ngram(scores_NxV, sequences_NxS, cur_len, ngram_size: int):
  """Bans each token that would complete an n-gram already in the sequence."""
  n, s = sequences_NxS.shape
  v, g = scores_NxV.shape[-1], ngram_size
  if s < g:
    return scores_NxV
  w = s - g + 1  # window start positions
  prefix_NxG1 = jax.lax.dynamic_slice_in_dim(sequences_NxS, jnp.maximum(cur_len - g + 1, 0), g - 1, 1)
  match_NxW = jnp.arange(w) <= cur_len - g  # windows lying wholly inside the filled slots
  for i in range(g - 1):
    match_NxW = match_NxW & (sequences_NxS[:, i:i + w] == prefix_NxG1[:, i:i + 1])
  last_NxW = sequences_NxS[:, g - 1:]
  ids_NxW = jnp.where(match_NxW & (last_NxW >= 0), jnp.minimum(last_NxW, v), v)
  banned = jnp.zeros((n, v + 1), bool).at[jnp.arange(n)[:, None], ids_NxW].set(True)[:, :v]
  return jnp.where(banned, -jnp.inf, scores_NxV)


def bad_words(scores_NxV, sequences_NxS, cur_len, groups):
  """Bans the last token of each banned sequence whose prefix ends the sequence so far."""
  n, s = sequences_NxS.shape
  hits_NxV = jnp.zeros(scores_NxV.shape, jnp.int32)  # a count: several words may share a last token
  for prefixes_KxM, last_K in groups:
    m = prefixes_KxM.shape[1]
    if m > s:
      continue
    tail_NxM = jax.lax.dynamic_slice_in_dim(sequences_NxS, jnp.maximum(cur_len - m, 0), m, 1)
    match_NxK = jnp.all(tail_NxM[:, None, :] == prefixes_KxM[None], axis=-1) & (cur_len >= m)
    hits_NxV = hits_NxV.at[:, last_K].add(match_NxK.astype(jnp.int32))
  # transformers adds a bias of -inf (not a fill), so +inf logits become nan as there.
  return scores_NxV + jnp.where(hits_NxV > 0, -jnp.inf, 0.0)


def _forced(scores_NxV, ids, vocab_size):
  """-inf everywhere but `ids`, which get 0: the next token is forced."""
  return jnp.where(_mask_V(ids, vocab_size), 0.0, jnp.full_like(scores_NxV, -jnp.inf))


def _keys(x):
  """uint32 keys in the order of the float32 values (-inf lowest), for bit-by-bit selection."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_keys(keys):
  """The float32 values of `_keys` keys."""
  bits = jnp.where((keys >> 31) == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _largest_key(ok, rows: int):
  """Per row the largest uint32 t with ok(t), ok monotone (true up to some t, ok(0) true).

  A radix select: 32 passes of counting over the row find an exact order statistic with a traced
  k, where a full-vocabulary sort costs ~15x more on CPU (and is slow on TPU).
  """
  def bit(i, t_N):
    cand_N = t_N | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(ok(cand_N[:, None]), cand_N, t_N)
  return jax.lax.fori_loop(0, 32, bit, jnp.zeros((rows,), jnp.uint32))


def kth_largest(x_NxV, k):
  """[N, 1] the k-th largest value of each row (counting ties, as torch.topk's last value)."""
  keys = _keys(x_NxV)
  t_N = _largest_key(lambda t: jnp.sum(keys >= t, axis=-1) >= k, x_NxV.shape[0])
  return _from_keys(t_N)[:, None]


def top_k(scores_NxV, k):
  """Keeps the logits >= the k-th largest (ties included, as torch.topk's threshold does)."""
  return jnp.where(scores_NxV < kth_largest(scores_NxV, k), -jnp.inf, scores_NxV)


def top_p(scores_NxV, cut, keep_Nx1):
  """Removes the least likely tokens whose total probability stays <= 1 - top_p (`cut`).

  transformers removes a prefix of the ascending sort, which ends just before the first value
  whose cumulative probability exceeds `cut`: that value is found here by its key, and no more
  than down to `keep_Nx1` (the min_tokens_to_keep-th largest). Tokens tied with it are all kept;
  torch's (unstable) sort drops an arbitrary subset of them, so only such ties can differ.
  """
  probs_NxV = jax.nn.softmax(scores_NxV, axis=-1)
  keys = _keys(scores_NxV)
  below = lambda t: jnp.sum(jnp.where(keys < t, probs_NxV, 0.0), axis=-1) <= cut  # noqa: E731
  first_kept_N = jnp.minimum(_largest_key(below, scores_NxV.shape[0]), _keys(keep_Nx1)[:, 0])
  remove = (cut > 0) & (scores_NxV < _from_keys(first_kept_N)[:, None])
  return jnp.where(remove, -jnp.inf, scores_NxV)


def min_p(scores_NxV, min_p_value, keep_Nx1):
  """Removes tokens less likely than min_p times the most likely one, keeping those >= keep_Nx1."""
  probs_NxV = jax.nn.softmax(scores_NxV, axis=-1)
  remove = probs_NxV < min_p_value * jnp.max(probs_NxV, axis=-1, keepdims=True)
  return jnp.where(remove & (scores_NxV < keep_Nx1), -jnp.inf, scores_NxV)


def apply(spec: Spec, values, logits_NxV, sequences_NxS, cur_len):
  """The processed logits of one step, in transformers' order (see the module docstring)."""
  v = logits_NxV.shape[-1]
  pad_len = values["prompt_pad_len"]
  if pad_len.ndim and pad_len.shape[0] != logits_NxV.shape[0]:
    raise ValueError(f"build(attention_mask=...) had {pad_len.shape[0]} rows but the logits have "
                     f"{logits_NxV.shape[0]}: pass the mask repeated per beam / returned sequence.")
  x = logits_NxV.astype(jnp.float32)
  x = repetition_penalty(x, sequences_NxS, cur_len, values["repetition_penalty"],
                         values["prompt_pad_len"])
  if spec.no_repeat_ngram_size:
    x = no_repeat_ngram(x, sequences_NxS, cur_len, spec.no_repeat_ngram_size)
  if spec.bad_words:
    x = bad_words(x, sequences_NxS, cur_len, values["bad_words"])
  if spec.min_length:
    x = jnp.where((cur_len < values["min_length"]) & _mask_V(values["eos_ids"], v), -jnp.inf, x)
  if spec.forced_bos:
    x = jnp.where(cur_len == 1, _forced(x, values["forced_bos_id"][None], v), x)
  if spec.forced_eos:
    x = jnp.where(cur_len == values["max_length"] - 1, _forced(x, values["forced_eos_ids"], v), x)
  if spec.suppress:
    x = jnp.where(_mask_V(values["suppress_ids"], v), -jnp.inf, x)
  if spec.begin_suppress:
    begin = (cur_len == values["begin_index"]) & _mask_V(values["begin_suppress_ids"], v)
    x = jnp.where(begin, -jnp.inf, x)
  if spec.sample:
    x = x / values["temperature"]
    # The min_tokens_to_keep-th largest: top-k keeps at least that many (k >= it), top-p and
    # min-p never go below it, so one value serves all three.
    keep = spec.min_tokens_to_keep
    keep_Nx1 = jnp.max(x, axis=-1, keepdims=True) if keep == 1 else kth_largest(x, keep)
    x = top_k(x, values["top_k"])
    x = top_p(x, values["top_p_cut"], keep_Nx1)
    x = min_p(x, values["min_p"], keep_Nx1)
  return x


def sample(key, logits_NxV):
  """Draws one token per row from softmax(logits) (what transformers' multinomial draws)."""
  return jax.random.categorical(key, logits_NxV, axis=-1).astype(jnp.int32)
