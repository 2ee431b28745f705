"""Logits processors against transformers' own `_get_logits_processor` chain (no model needed)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

from engine_utils import count_compiles  # noqa: E402
from flaxhf.generation import processors  # noqa: E402

V, N, P, S = 32, 4, 6, 16  # vocab, rows, prompt slots, buffer slots (= max_length)
PAD, EOS, BOS, START = 1, [2, 3], 4, 0
PROMPT_LENS = [6, 4, 1, 3]  # real tokens per row; the rest of the P slots is left padding


def _buffers(seed=0):
  """A left-padded prompt and generated tokens from a small alphabet (so tokens and n-grams repeat);
  slots past every cur_len tested hold other tokens, which must be ignored."""
  rng = np.random.RandomState(seed)
  seq = rng.randint(5, 11, size=(N, S)).astype(np.int32)
  mask = np.ones((N, P), np.int32)
  for i, n in enumerate(PROMPT_LENS):
    seq[i, :P - n], mask[i, :P - n] = PAD, 0
  seq[0, 8:10] = [7, 8]  # a banned word's prefix ([7, 8] -> ...) and a full 3-word prefix below
  seq[1, 9:11] = [5, 6]
  return seq, mask


def _encdec_buffer(seed=0):
  """An encoder-decoder decoder buffer: decoder_start_token_id, then generated tokens (P = 1)."""
  seq = np.random.RandomState(seed).randint(5, 11, size=(N, S)).astype(np.int32)
  seq[:, 0] = START
  return seq


class _Model:
  """What `_get_logits_processor` and its helpers read from a transformers model."""

  _merge_criteria_processor_list = GenerationMixin._merge_criteria_processor_list

  def __init__(self, is_encoder_decoder):
    self.config = types.SimpleNamespace(is_encoder_decoder=is_encoder_decoder)


def _reference(settings, ids_NxP, mask_NxP=None, is_encoder_decoder=False, resolve_lengths=True):
  """(transformers' processor list, the config prepared as `generate` prepares it)."""
  model = _Model(is_encoder_decoder)
  gc = GenerationConfig(**{"eos_token_id": EOS, "pad_token_id": PAD, "max_length": S,
                           "decoder_start_token_id": START, **settings})
  gc.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
  ids = torch.tensor(ids_NxP, dtype=torch.long)
  GenerationMixin._prepare_special_tokens(model, gc, True, device="cpu", batch_size=len(ids))
  if resolve_lengths:
    gc = GenerationMixin._prepare_generated_length(
        model, gc, has_default_max_length=False, has_default_min_length=True,
        model_input_name="input_ids", input_ids_length=ids.shape[1], inputs_tensor=ids)
  # generate drops an all-ones mask before building the processors
  mask = None if mask_NxP is None or mask_NxP.all() else torch.tensor(mask_NxP)
  kwargs = {"decoder_attention_mask" if is_encoder_decoder else "attention_mask": mask}
  procs = GenerationMixin._get_logits_processor(
      model, gc, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids, device="cpu",
      model_kwargs=kwargs)
  return procs, gc


_apply = jax.jit(processors.apply, static_argnums=0)


def _compare(settings, cur_lens, *, seq=None, mask=None, prompt_len=P, is_encoder_decoder=False,
             expect=None, seed=0, scale=3.0, resolve_lengths=True):
  """Asserts flaxhf's chain == transformers' at every cur_len; returns how many steps it changed."""
  if seq is None:
    seq, mask = _buffers(seed)
  procs, gc = _reference(settings, seq[:, :prompt_len], mask, is_encoder_decoder, resolve_lengths)
  if expect is not None:
    assert [type(p).__name__ for p in procs] == expect
  spec, values = processors.build(gc, prompt_len=prompt_len, vocab_size=V, attention_mask=mask,
                                  is_encoder_decoder=is_encoder_decoder)
  rng = np.random.RandomState(seed + 1)
  changed = 0
  for cur_len in cur_lens:
    logits = (rng.normal(size=(N, V)) * scale).astype(np.float32)
    want = procs(torch.tensor(seq[:, :cur_len], dtype=torch.long), torch.tensor(logits)).numpy()
    got = np.asarray(_apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(cur_len)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"cur_len={cur_len}")
    changed += not np.array_equal(want, logits)
  return changed


STEPS = list(range(P, S))  # every step of the buffer: before/at/after each length threshold

SINGLE = {  # one processor each: settings, transformers' list, steps where it must change logits
    "repetition_penalty": ({"repetition_penalty": 1.7}, ["RepetitionPenaltyLogitsProcessor"], 10),
    "repetition_penalty_below_1": ({"repetition_penalty": 0.6}, ["RepetitionPenaltyLogitsProcessor"],
                                   10),
    "no_repeat_ngram_1": ({"no_repeat_ngram_size": 1}, ["NoRepeatNGramLogitsProcessor"], 10),
    "no_repeat_ngram_2": ({"no_repeat_ngram_size": 2}, ["NoRepeatNGramLogitsProcessor"], 5),
    "no_repeat_ngram_3": ({"no_repeat_ngram_size": 3}, ["NoRepeatNGramLogitsProcessor"], 1),
    "bad_words": ({"bad_words_ids": [[7, 8, 9], [9], [5, 6, 10], [2], [7, 8, 9], [8, 30]]},
                  ["NoBadWordsLogitsProcessor"], 10),
    "min_length": ({"min_length": 11}, ["MinLengthLogitsProcessor"], 5),
    "min_new_tokens": ({"min_new_tokens": 3}, ["MinLengthLogitsProcessor",
                                               "MinNewTokensLengthLogitsProcessor"], 3),
    # min_new_tokens wins over a larger min_length (generate resolves min_length from it)
    "min_new_tokens_over_min_length": ({"min_new_tokens": 2, "min_length": 13},
                                       ["MinLengthLogitsProcessor",
                                        "MinNewTokensLengthLogitsProcessor"], 2),
    "forced_eos_list": ({"forced_eos_token_id": EOS}, ["ForcedEOSTokenLogitsProcessor"], 1),
    "forced_eos_int": ({"forced_eos_token_id": 7}, ["ForcedEOSTokenLogitsProcessor"], 1),
    "suppress_tokens": ({"suppress_tokens": [5, 7, 40]}, ["SuppressTokensLogitsProcessor"], 10),
    "begin_suppress_tokens": ({"begin_suppress_tokens": [5, 6, 2]},
                              ["SuppressTokensAtBeginLogitsProcessor"], 1),
    "temperature": ({"do_sample": True, "temperature": 0.7, "top_k": 0},
                    ["TemperatureLogitsWarper"], 10),
    "top_k": ({"do_sample": True, "top_k": 5}, ["TopKLogitsWarper"], 10),
    "top_k_above_vocab": ({"do_sample": True, "top_k": 100, "temperature": 1.3},
                          ["TemperatureLogitsWarper", "TopKLogitsWarper"], 10),
    "top_p": ({"do_sample": True, "top_p": 0.8, "top_k": 0}, ["TopPLogitsWarper"], 10),
    "top_p_zero": ({"do_sample": True, "top_p": 0.0, "top_k": 0}, ["TopPLogitsWarper"], 10),
    "min_p": ({"do_sample": True, "min_p": 0.2, "top_k": 0}, ["MinPLogitsWarper"], 10),
    # beam sampling keeps len(eos) + 1 = 3 tokens through every warper
    "beam_sample_keep": ({"do_sample": True, "num_beams": 2, "top_k": 1, "top_p": 0.0,
                          "min_p": 1.0}, ["TopKLogitsWarper", "TopPLogitsWarper",
                                          "MinPLogitsWarper"], 10),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_processor_matches_transformers(name):
  settings, expect, steps_changed = SINGLE[name]
  changed = _compare(settings, STEPS, expect=expect)
  assert changed >= steps_changed, f"{name} changed only {changed} of {len(STEPS)} steps"


def test_repetition_penalty_counts_left_padding_only_without_mask():
  """With a mask, left padding is not penalised (transformers' prompt_ignore_length); without one
  (or an all-ones mask, which generate drops), the pad token counts like any other."""
  seq, mask = _buffers()
  seq[:, P:] = 20  # generated tokens never include the pad id
  assert _compare({"repetition_penalty": 1.7}, STEPS, seq=seq, mask=mask) == 10
  assert _compare({"repetition_penalty": 1.7}, STEPS, seq=seq, mask=None) == 10
  logits = jnp.ones((N, V))
  for m, pad_penalized in ((mask, [False] * N), (None, [False, True, True, True])):  # row 0: no pad
    _, gc = _reference({"repetition_penalty": 2.0}, seq[:, :P], m)
    spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=m)
    out = _apply(spec, values, logits, jnp.asarray(seq), jnp.int32(P))
    assert list(np.asarray(out[:, PAD]) == 0.5) == pad_penalized


def test_min_length_and_min_new_tokens_unresolved_both_apply():
  """Given a config whose min_length was not resolved from min_new_tokens, both processors ban EOS,
  so the later threshold wins (here min_length 13 over P + 2)."""
  settings = {"min_new_tokens": 2, "min_length": 13}
  assert _compare(settings, STEPS, resolve_lengths=False) == 13 - P


def test_bad_word_prefix_as_long_as_the_sequence():
  """A banned word's prefix may span every filled slot (decoder_start_token_id, then one token)."""
  seq = _encdec_buffer()
  seq[:2, 1] = [7, 8]
  settings = {"bad_words_ids": [[START, 9], [START, 7, 5], [START, 8, 30], [8, 30]]}
  assert _compare(settings, [1, 2, 3], seq=seq, prompt_len=1, is_encoder_decoder=True) == 2


def test_ties_in_top_k_keep_what_transformers_keeps():
  """Integer-valued logits tie a lot: top-k keeps every logit equal to the k-th largest."""
  changed = _compare({"do_sample": True, "top_k": 4}, STEPS, scale=1.0, seed=3)
  assert changed == len(STEPS)
  seq, mask = _buffers()
  procs, gc = _reference({"do_sample": True, "top_k": 4}, seq[:, :P], mask)
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)
  logits = np.zeros((N, V), np.float32)
  logits[:, :6] = [5, 4, 3, 3, 3, 1]  # the 4th largest (3) is tied three ways: 5 kept
  want = procs(torch.tensor(seq[:, :P], dtype=torch.long), torch.tensor(logits)).numpy()
  got = np.asarray(_apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(P)))
  np.testing.assert_array_equal(got, want)
  assert (np.isfinite(got).sum(axis=1) == 5).all()


@pytest.mark.parametrize("settings", [{"top_k": 1}, {"top_k": 0, "top_p": 0.4},
                                      {"top_k": 0, "min_p": 1.0}])
def test_thresholds_are_exact_to_the_last_bit(settings):
  """The kept token and one a single float step below it: only the first survives each filter."""
  seq, mask = _buffers()
  procs, gc = _reference({"do_sample": True, **settings}, seq[:, :P], mask)
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)
  logits = np.full((N, V), -30.0, np.float32)
  logits[:, 7] = 2.0
  logits[:, 9] = np.nextafter(np.float32(2.0), np.float32(-np.inf))
  want = procs(torch.tensor(seq[:, :P], dtype=torch.long), torch.tensor(logits)).numpy()
  got = np.asarray(_apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(P)))
  np.testing.assert_array_equal(got, want)
  assert (np.isfinite(got).sum(axis=1) == 1).all() and np.isfinite(got[:, 7]).all()


def test_top_p_keeps_every_token_tied_with_the_first_kept_one():
  """The one documented difference: uniform logits, top_p 0.75. transformers keeps 24 of 32 tokens
  (which ones depends on torch's unstable sort); flaxhf keeps all 32, as none is less likely."""
  seq, mask = _buffers()
  procs, gc = _reference({"do_sample": True, "top_k": 0, "top_p": 0.75}, seq[:, :P], mask)
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)
  logits = np.zeros((N, V), np.float32)
  want = procs(torch.tensor(seq[:, :P], dtype=torch.long), torch.tensor(logits)).numpy()
  got = np.asarray(_apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(P)))
  assert (np.isfinite(want).sum(axis=1) == 24).all() and np.isfinite(got).all()


def test_neutral_values_leave_logits_bit_for_bit_unchanged():
  """Penalty 1, temperature 1, top_k 0, top_p 1, min_p None add no transformers processor; flaxhf
  runs them anyway (so they stay values) and must not change a bit, even where a probability
  underflows to 0 (-200) or a logit is -inf."""
  seq, mask = _buffers()
  settings = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None,
              "repetition_penalty": 1.0}
  procs, gc = _reference(settings, seq[:, :P], mask)
  assert len(procs) == 0
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)
  logits = (np.random.RandomState(2).normal(size=(N, V)) * 3).astype(np.float32)
  logits[:, 3], logits[:, 4], logits[:, 5] = -200.0, -np.inf, 1e30
  got = np.asarray(_apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(P + 4)))
  np.testing.assert_array_equal(got, logits)


def test_mask_rows_must_match_logits_rows():
  seq, mask = _buffers()
  _, gc = _reference({"repetition_penalty": 1.5}, seq[:, :P], mask)
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask[:2])
  with pytest.raises(ValueError, match="repeated per beam"):
    processors.apply(spec, values, jnp.zeros((N, V)), jnp.asarray(seq), jnp.int32(P))


CHAIN = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
         "bad_words_ids": [[7, 8, 9], [9], [5, 6, 10], [3]], "min_new_tokens": 2, "min_length": 5,
         "forced_eos_token_id": EOS, "suppress_tokens": [10, 31], "begin_suppress_tokens": [5, 6]}
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 12, "top_p": 0.9, "min_p": 0.05}
CHAIN_NAMES = ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
               "NoBadWordsLogitsProcessor", "MinLengthLogitsProcessor",
               "MinNewTokensLengthLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
               "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor"]
WARPER_NAMES = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                "MinPLogitsWarper"]


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_full_chain_matches_transformers(mode):
  settings = {**CHAIN, **(SAMPLING if mode == "sample" else {}),
              **({"num_beams": 2} if mode == "beam" else {})}
  expect = CHAIN_NAMES + (WARPER_NAMES if mode == "sample" else [])
  assert _compare(settings, STEPS, expect=expect) == len(STEPS)


def test_encoder_decoder_chain_forced_bos_then_begin_suppress():
  """P = 1 (decoder_start_token_id): BOS forced at cur_len 1, begin-suppress moves to cur_len 2."""
  settings = {**CHAIN, **SAMPLING, "forced_bos_token_id": BOS, "begin_suppress_tokens": [5, BOS]}
  expect = (CHAIN_NAMES[:5] + ["ForcedBOSTokenLogitsProcessor"] + CHAIN_NAMES[5:] + WARPER_NAMES)
  seq = _encdec_buffer()
  assert _compare(settings, range(1, S), seq=seq, prompt_len=1, is_encoder_decoder=True,
                  expect=expect) == S - 1
  _, gc = _reference(settings, seq[:, :1], None, True)
  _, values = processors.build(gc, prompt_len=1, vocab_size=V, is_encoder_decoder=True)
  assert int(values["begin_index"]) == 2


def test_changing_values_does_not_recompile():
  """Values (incl. turning a warper or the penalty off) and the prompt length are traced."""
  seq, mask = _buffers()
  variants = [
      {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "repetition_penalty": 1.3},
      {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "repetition_penalty": 1.0},
      {"temperature": 1.6, "top_k": 50, "top_p": 0.5, "min_p": 0.0, "repetition_penalty": 0.8,
       "min_new_tokens": 4},
      {"temperature": 0.3, "top_k": 3, "top_p": 0.99, "min_p": 0.3, "repetition_penalty": 2.5,
       "min_length": 12},
  ]
  logits = (np.random.RandomState(5).normal(size=(N, V)) * 3).astype(np.float32)
  ids = torch.tensor(seq[:, :P + 3], dtype=torch.long)
  built = []
  for v in variants:
    procs, gc = _reference({"do_sample": True, "bad_words_ids": [[7, 8]], **v}, seq[:, :P], mask)
    built.append((procs, processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)))
  assert len({spec for _, (spec, _) in built}) == 1
  _, gc = _reference({"do_sample": True, "bad_words_ids": [[7, 8]]}, seq[:, :P - 1], mask[:, 1:])
  assert processors.build(gc, prompt_len=P - 1, vocab_size=V, attention_mask=mask[:, 1:])[0] \
      == built[0][1][0]
  apply = jax.jit(processors.apply, static_argnums=0)
  args = (jnp.asarray(logits), jnp.asarray(seq), jnp.int32(P + 3))
  apply(built[0][1][0], built[0][1][1], *args).block_until_ready()
  outs = []
  with count_compiles() as compiles:
    for procs, (spec, values) in built:
      out = np.asarray(apply(spec, values, *args))
      np.testing.assert_allclose(out, procs(ids, torch.tensor(logits)).numpy(), rtol=1e-6, atol=1e-6)
      outs.append(out)
  assert compiles == []
  assert all(not np.array_equal(outs[0], o) for o in outs[1:])


def test_sampled_frequencies_match_processed_distribution():
  """20000 draws from one processed row follow torch's softmax of transformers' processed logits;
  filtered tokens never appear."""
  seq, mask = _buffers()
  procs, gc = _reference({**SAMPLING, "repetition_penalty": 1.2}, seq[:, :P], mask)
  spec, values = processors.build(gc, prompt_len=P, vocab_size=V, attention_mask=mask)
  logits = (np.random.RandomState(7).normal(size=(N, V)) * 2).astype(np.float32)
  cur_len = P + 2
  want = procs(torch.tensor(seq[:, :cur_len], dtype=torch.long), torch.tensor(logits))
  probs = torch.softmax(want, dim=-1)[0].numpy().astype(np.float64)
  kept = probs > 0
  assert 2 < kept.sum() < 12  # top-p / min-p cut below top-k's 12
  row = _apply(spec, values, jnp.asarray(logits), jnp.asarray(seq), jnp.int32(cur_len))[:1]
  draws = 20000
  tokens = processors.sample(jax.random.key(0), jnp.broadcast_to(row, (draws, V)))
  assert tokens.shape == (draws,) and tokens.dtype == jnp.int32
  freq = np.bincount(np.asarray(tokens), minlength=V) / draws
  assert (freq[~kept] == 0).all()
  stderr = np.sqrt(probs * (1 - probs) / draws)
  np.testing.assert_array_less(np.abs(freq - probs), 4.5 * stderr + 1e-12)


@pytest.mark.parametrize("name,value", [
    ("typical_p", 0.9), ("epsilon_cutoff", 0.1), ("eta_cutoff", 0.1), ("top_h", 0.5),
    ("sequence_bias", {(5,): 1.0}), ("encoder_repetition_penalty", 1.2),
    ("encoder_no_repeat_ngram_size", 2), ("exponential_decay_length_penalty", (2, 1.1)),
    ("renormalize_logits", True), ("guidance_scale", 1.5), ("remove_invalid_values", True),
    ("watermarking_config", {"greenlist_ratio": 0.25}),
])
def test_unsupported_settings_raise_naming_them(name, value):
  gc = GenerationConfig(do_sample=True, **{name: value})
  with pytest.raises(ValueError, match=f"Unsupported generation settings.*{name}="):
    processors.check_supported(gc)
  with pytest.raises(ValueError, match=f"{name}="):
    processors.build(gc, prompt_len=P, vocab_size=V)


def test_sampling_only_settings_are_ignored_without_sampling_as_in_transformers():
  seq, mask = _buffers()
  procs, gc = _reference({"typical_p": 0.9, "epsilon_cutoff": 0.1}, seq[:, :P], mask)
  assert [type(p).__name__ for p in procs] == []
  processors.check_supported(gc)
  with pytest.raises(ValueError, match="typical_p=0.9"):
    processors.check_supported(gc, do_sample=True)


def test_unsupported_generate_arguments_and_bad_values_raise():
  gc = GenerationConfig(eos_token_id=EOS)
  with pytest.raises(ValueError, match="logits_processor="):
    processors.check_supported(gc, logits_processor=[object()])
  processors.check_supported(gc, logits_processor=[], stopping_criteria=None)
  for settings, match in [({"bad_words_ids": [[5, 40]]}, "outside the vocabulary"),
                          ({"bad_words_ids": [[2], [3]]}, "only bans EOS"),
                          ({"bad_words_ids": [5]}, "list of lists"),
                          ({"forced_eos_token_id": 40}, "outside the vocabulary"),
                          ({"do_sample": True, "temperature": 0.0}, "do_sample=False"),
                          ({"do_sample": True, "top_k": -1}, "top_k"),
                          ({"repetition_penalty": -1.0}, "repetition_penalty")]:
    with pytest.raises(ValueError, match=match):
      processors.build(GenerationConfig(eos_token_id=EOS, max_length=S, **settings), prompt_len=P,
                       vocab_size=V)
