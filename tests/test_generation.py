"""`generate` against transformers PyTorch `generate` on the same weights: the same tokens.

A tiny random GPT-2 with the real GPT-2 BPE vocabulary, ragged prompts left-padded by the real
tokenizer. Weights are drawn wider than the 0.02 init so the next-token distribution is peaked: two
candidates then never sit within float rounding of each other, and equality is a fair test.
"""

import numpy as np
import pytest
import transformers

import flaxhf
from engine_utils import count_compiles

PROMPTS = ["The quick brown fox jumps over", "Hello", "In a hole in the ground there lived a"]


@pytest.fixture(scope="module")
def tokenizer():
  from flaxhf.data.clm import gpt2_tokenizer_dir
  tok = transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())
  tok.padding_side = "left"
  tok.pad_token = tok.eos_token
  return tok


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
  """(PyTorch GPT2LMHeadModel, flaxhf twin) with the same random weights."""
  import torch
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                   initializer_range=0.3)
  pt = transformers.GPT2LMHeadModel(config).eval()
  path = tmp_path_factory.mktemp("gpt2")
  pt.save_pretrained(path)
  return pt, flaxhf.FlaxGPT2LMHeadModel.from_pretrained(str(path))


@pytest.fixture(scope="module")
def batch(tokenizer):
  return tokenizer(PROMPTS, return_tensors="np", padding=True)


def torch_generate(pt, batch, **kwargs):
  import torch
  with torch.no_grad():
    out = pt.generate(input_ids=torch.tensor(batch["input_ids"]),
                      attention_mask=torch.tensor(batch["attention_mask"]), **kwargs)
  return out


def assert_same(pt, fx, batch, **kwargs):
  want = torch_generate(pt, batch, **kwargs)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
  if kwargs.get("return_dict_in_generate"):
    np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy())
    return got, want
  np.testing.assert_array_equal(np.asarray(got.sequences), want.numpy())
  return got, want


def _eos_candidates(pt, batch):
  """Tokens greedy decoding emits early on: as EOS ids they make rows finish at different steps."""
  seq = torch_generate(pt, batch, do_sample=False, max_new_tokens=8).numpy()
  new = seq[:, batch["input_ids"].shape[1]:]
  return [int(new[0, 2]), int(new[2, 4])]


GREEDY_CASES = {
    "plain": dict(max_new_tokens=12),
    "repetition_penalty": dict(max_new_tokens=12, repetition_penalty=1.5),
    "no_repeat_ngram": dict(max_new_tokens=12, no_repeat_ngram_size=2),
    "min_new_tokens": dict(max_new_tokens=10, min_new_tokens=6),
    "max_length": dict(max_length=20),
}


@pytest.mark.parametrize("case", sorted(GREEDY_CASES))
def test_greedy_equals_transformers(twins, batch, case):
  pt, fx = twins
  assert_same(pt, fx, batch, do_sample=False, **GREEDY_CASES[case])


def test_greedy_with_several_eos_and_bad_words(twins, batch):
  pt, fx = twins
  eos = _eos_candidates(pt, batch)
  got, _ = assert_same(pt, fx, batch, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                       pad_token_id=0)
  # Rows stop at different steps and are padded after their EOS.
  assert (np.asarray(got.sequences) == 0).any()
  bad = [[eos[0]], [int(batch["input_ids"][0, -1]), 11]]
  assert_same(pt, fx, batch, do_sample=False, max_new_tokens=12, eos_token_id=eos,
              bad_words_ids=bad)


BEAM_CASES = {
    "early_true": dict(early_stopping=True),
    "early_false": dict(early_stopping=False),
    "early_never": dict(early_stopping="never"),
    "length_penalty_short": dict(length_penalty=-1.0, early_stopping="never"),
    "length_penalty_long": dict(length_penalty=2.0, early_stopping="never"),
    "repetition_no_repeat": dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
    "min_new_tokens": dict(min_new_tokens=5),
}


@pytest.mark.parametrize("case", sorted(BEAM_CASES))
def test_beam_search_equals_transformers(twins, batch, case):
  pt, fx = twins
  eos = _eos_candidates(pt, batch)
  got, want = assert_same(pt, fx, batch, num_beams=4, num_return_sequences=2, max_new_tokens=10,
                          eos_token_id=eos, return_dict_in_generate=True, output_scores=True,
                          **BEAM_CASES[case])
  np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.beam_indices), want.beam_indices.numpy())
  assert len(got.scores) == len(want.scores)
  finite = np.isfinite(want.scores[0].numpy())
  np.testing.assert_allclose(np.asarray(got.scores[0])[finite], want.scores[0].numpy()[finite],
                             rtol=1e-4, atol=1e-4)


def test_greedy_scores_equal_transformers(twins, batch):
  pt, fx = twins
  got, want = assert_same(pt, fx, batch, do_sample=False, max_new_tokens=5,
                          return_dict_in_generate=True, output_scores=True, repetition_penalty=1.2)
  assert len(got.scores) == len(want.scores) == 5
  for g, w in zip(got.scores, want.scores):
    w = w.numpy()
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)


def test_generation_config_saved_and_loaded(twins, tmp_path):
  _, fx = twins
  fx.generation_config = transformers.GenerationConfig(max_new_tokens=3, num_beams=2,
                                                       eos_token_id=50256, pad_token_id=50256)
  try:
    fx.save_pretrained(tmp_path)
  finally:
    fx.generation_config = None
  loaded = flaxhf.FlaxGPT2LMHeadModel.from_pretrained(str(tmp_path))
  assert loaded.generation_config.num_beams == 2 and loaded.generation_config.max_new_tokens == 3
  out = loaded.generate(np.array([[464, 2068]]))
  assert out.sequences.shape == (1, 5)  # the saved max_new_tokens applies


def test_changing_sampling_values_does_not_recompile(twins, batch):
  _, fx = twins
  import jax
  kw = dict(attention_mask=batch["attention_mask"], do_sample=True, max_new_tokens=6)
  first = fx.generate(batch["input_ids"], **kw, temperature=0.7, top_k=20, top_p=0.9,
                      prng_key=jax.random.key(1))
  with count_compiles("decode_program") as compiles:
    second = fx.generate(batch["input_ids"], **kw, temperature=1.3, top_k=5, top_p=0.5,
                         repetition_penalty=1.1, min_p=0.05, prng_key=jax.random.key(2))
    # A longer prompt in the same length bucket (9 and 10 tokens pad to 16) shares the program.
    longer = np.pad(batch["input_ids"], ((0, 0), (1, 0)), constant_values=50256)
    fx.generate(longer, **{**kw, "attention_mask": np.pad(batch["attention_mask"], ((0, 0), (1, 0)))},
                temperature=1.0, top_k=0, top_p=1.0)
  assert len(compiles) == 0
  assert first.sequences.shape == second.sequences.shape
  with count_compiles("decode_program") as compiles:
    fx.generate(batch["input_ids"], **{**kw, "max_new_tokens": 7})  # another shape: one compile
  assert len(compiles) == 1


def test_sampling_is_seeded_and_varies(twins, batch):
  _, fx = twins
  import jax
  kw = dict(attention_mask=batch["attention_mask"], do_sample=True, max_new_tokens=8,
            temperature=1.5)
  a = fx.generate(batch["input_ids"], prng_key=jax.random.key(3), **kw).sequences
  b = fx.generate(batch["input_ids"], prng_key=jax.random.key(3), **kw).sequences
  c = fx.generate(batch["input_ids"], prng_key=jax.random.key(4), **kw).sequences
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()


def test_bad_generation_settings_are_errors(twins, batch):
  _, fx = twins
  ids = batch["input_ids"]
  with pytest.raises(ValueError, match="max_new_tokens"):
    fx.generate(ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="num_return_sequences"):
    fx.generate(ids, num_beams=2, num_return_sequences=3, max_new_tokens=2)
  with pytest.raises(ValueError, match="positions"):
    fx.generate(np.ones((1, 70), np.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="positions"):
    fx.generate(ids, max_new_tokens=64)
  with pytest.raises(ValueError, match="num_beam_groups"):
    fx.generate(ids, num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=2)
  with pytest.raises(TypeError, match="not_a_setting"):
    fx.generate(ids, not_a_setting=3, max_new_tokens=2)
