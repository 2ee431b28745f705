"""flaxhf.pipeline("text-generation") against transformers' pipeline on the PyTorch twin.

A tiny random GPT-2 with the real GPT-2 BPE tokenizer, weights drawn wide (as test_generation.py)
so next-token choices are never near ties and equal text is a fair test.
"""

import jax
import numpy as np
import pytest
import transformers

import flaxhf
from engine_utils import count_compiles

PROMPTS = ["The quick brown fox jumps over", "Hello", "In a hole in the ground there lived"]
NEW = 10  # one max_new_tokens throughout, so the decode programs are shared between tests
# generate compiles per (rows, prompt bucket, new tokens, beams, ...): the prompts (6, 1, 8 tokens)
# share the 8 bucket, and the cases below reuse a handful of programs.


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(model folder with tokenizer, PyTorch twin)."""
  import torch
  from flaxhf.data.clm import gpt2_tokenizer_dir
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                   initializer_range=0.3)
  pt = transformers.GPT2LMHeadModel(config).eval()
  path = tmp_path_factory.mktemp("gpt2")
  pt.save_pretrained(path)
  transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(path)
  return str(path), pt


@pytest.fixture(scope="module")
def pipes(folder):
  """(flaxhf pipeline, transformers pipeline) on the same weights. GPT-2 has no pad token: the
  transformers pipeline cannot batch without one, so its tokenizer gets EOS as pad (flaxhf pads
  with EOS by itself)."""
  path, pt = folder
  tok = transformers.AutoTokenizer.from_pretrained(path)
  tok.pad_token = tok.eos_token
  fp = flaxhf.pipeline("text-generation", model=path)
  assert fp.tokenizer.pad_token_id is None
  return fp, transformers.pipeline("text-generation", model=pt, tokenizer=tok)


GREEDY = dict(do_sample=False, max_new_tokens=NEW)
CASES = {
    "full_text": dict(GREEDY),
    "new_text": dict(GREEDY, return_full_text=False),
    "tensors": dict(GREEDY, return_tensors=True),
    "return_text": dict(GREEDY, return_text=True),
    "no_cleanup_keep_specials": dict(GREEDY, clean_up_tokenization_spaces=False,
                                     skip_special_tokens=False),
    "repetition_penalty": dict(GREEDY, repetition_penalty=1.5),  # a traced value: no new program
    "beam": dict(GREEDY, num_beams=3, num_return_sequences=2),
    "beam_new_text": dict(GREEDY, num_beams=3, num_return_sequences=2, return_full_text=False),
    "beam_tensors": dict(GREEDY, num_beams=3, num_return_sequences=2, return_tensors=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(pipes, case):
  fp, tp = pipes
  kwargs = CASES[case]
  single = fp(PROMPTS[0], **kwargs)
  assert single == tp(PROMPTS[0], **kwargs)
  assert len(single) == kwargs.get("num_return_sequences", 1)
  # Batches of 2 prompts of different lengths, left-padded: [[...], [...], [...]] as transformers.
  batched = fp(PROMPTS, batch_size=2, **kwargs)
  assert batched == tp(PROMPTS, batch_size=2, **kwargs)
  assert len(batched) == 3 and all(len(r) == len(single) for r in batched)
  assert batched[0] != batched[1]
  key = "generated_token_ids" if kwargs.get("return_tensors") else "generated_text"
  if key == "generated_text" and kwargs.get("return_full_text", True):
    assert all(r[key].startswith(p) for p, rows in zip(PROMPTS, batched) for r in rows)
  if key == "generated_token_ids":
    # Batched, the ids hold the batch's left padding (EOS, id 50256), as transformers returns them.
    assert batched[1][0][key][:3] == [50256] * 3 and single[0][key][0] != 50256


def test_prefix_max_length_and_generation_config(pipes):
  fp, tp = pipes
  prompts = PROMPTS[:2]  # 6 and 1 tokens; with the prefix's 5, 11 and 6
  for kwargs in (dict(GREEDY, prefix="Once upon a time,"),
                 dict(do_sample=False, max_length=16),  # a total length: 10 new tokens here
                 dict(prefix="Once upon a time,", do_sample=False, max_length=16),  # + the prefix
                 dict(generation_config=transformers.GenerationConfig(
                     max_new_tokens=NEW, num_beams=3, num_return_sequences=2, do_sample=False))):
    got = fp(prompts, batch_size=2, **kwargs)
    assert got == tp(prompts, batch_size=2, **kwargs), kwargs
  prefixed = fp(PROMPTS[1], **GREEDY, prefix="Once upon a time,")[0]["generated_text"]
  assert prefixed.startswith("Hello") and prefixed != fp(PROMPTS[1], **GREEDY)[0]["generated_text"]


def test_defaults_as_transformers(pipes, folder):
  fp, _ = pipes
  # transformers' pipeline defaults, only where the call and the model's generation config are silent.
  assert fp.prepare_generate_kwargs({}) == dict(max_new_tokens=256, do_sample=True, temperature=0.7)
  assert fp.prepare_generate_kwargs(dict(do_sample=False)) == dict(do_sample=False,
                                                                    max_new_tokens=256)
  assert fp.prepare_generate_kwargs(dict(max_length=30)) == dict(max_length=30, do_sample=True,
                                                                 temperature=0.7)
  tok = transformers.AutoTokenizer.from_pretrained(folder[0])
  tok.pad_token = tok.eos_token  # the pipeline passes the tokenizer's pad id, as transformers
  with_pad = flaxhf.pipeline("text-generation", model=fp.model, tokenizer=tok, max_new_tokens=5,
                             temperature=1.3)
  assert with_pad.prepare_generate_kwargs(dict(top_k=3)) == dict(
      max_new_tokens=5, temperature=1.3, top_k=3, do_sample=True, pad_token_id=50256)
  # The default samples (temperature 0.7, transformers' top_k 50): a new key each call, or the
  # one given, which then draws exactly what model.generate draws with it.
  ids = np.array([fp.tokenizer(PROMPTS[0])["input_ids"]])
  key = jax.random.key(7)
  want = fp.model.generate(ids, prng_key=key, do_sample=True, temperature=0.7, top_k=50,
                           max_new_tokens=NEW).sequences
  got = fp(PROMPTS[0], max_new_tokens=NEW, return_tensors=True, prng_key=key)
  assert got == [{"generated_token_ids": np.asarray(want)[0].tolist()}]
  draws = {fp(PROMPTS[0], max_new_tokens=NEW)[0]["generated_text"] for _ in range(3)}
  greedy = fp(PROMPTS[0], **GREEDY)[0]["generated_text"]
  assert len(draws | {greedy}) > 2


def test_rows_padded_to_a_power_of_two(pipes):
  fp, _ = pipes
  four = PROMPTS + ["Hello there"]
  fp(PROMPTS, batch_size=4, **GREEDY)  # 3 prompts run as 4 rows
  with count_compiles("decode_program") as compiles:
    got = fp(four, batch_size=4, **GREEDY)
  assert compiles == []
  assert got[:3] == fp(PROMPTS, batch_size=2, **GREEDY)  # the filler row changes nothing


def test_errors(pipes, folder):
  fp, _ = pipes
  with pytest.raises(TypeError, match=r"unknown argument.*\['max_new_tokenz'\]"):
    fp(PROMPTS[0], max_new_tokenz=3)
  with pytest.raises(TypeError, match="unknown argument"):
    flaxhf.pipeline("text-generation", model=folder[0], top_kk=3)
  head = flaxhf.FlaxGPT2ForSequenceClassification(fp.model.config)
  with pytest.raises(ValueError, match="causal_lm head.*FlaxGPT2ForSequenceClassification"):
    flaxhf.pipeline("text-generation", model=head, tokenizer=fp.tokenizer)
  with pytest.raises(ValueError, match="Chat input needs a tokenizer with a chat template"):
    fp([{"role": "user", "content": "Hi"}], **GREEDY)
  with pytest.raises(ValueError, match="str or a non-empty list"):
    fp([PROMPTS[0], 3])
  with pytest.raises(ValueError, match="has no tokens"):
    fp("", **GREEDY)
  with pytest.raises(ValueError, match="mutually exclusive"):
    fp(PROMPTS[0], return_full_text=False, return_tensors=True)
  with pytest.raises(ValueError, match="stop_sequence"):
    fp(PROMPTS[0], stop_sequence=".")
  with pytest.raises(ValueError, match="output_scores"):
    fp(PROMPTS[0], output_scores=True, return_dict_in_generate=True, **GREEDY)
  with pytest.raises(ValueError, match="num_return_sequences"):
    fp(PROMPTS[0], num_beams=2, num_return_sequences=3, max_new_tokens=NEW)
  with pytest.raises(ValueError, match="positions"):  # generate's own check, through the pipeline
    fp(PROMPTS[0], max_new_tokens=60)


CHATS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
         [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "It is"}]]


@pytest.mark.parametrize("case", ["one_chat", "chats", "new_text", "continue_false"])
def test_chat_input_equals_transformers(case, folder):
  """Conversations through the tokenizer's chat template; a last assistant message is continued."""
  from flaxhf.data.chat import DEFAULT_TEMPLATE
  path, pt = folder
  tok = transformers.AutoTokenizer.from_pretrained(path)
  tok.chat_template = DEFAULT_TEMPLATE
  tok.pad_token = tok.eos_token
  fp = flaxhf.pipeline("text-generation", model=path, tokenizer=tok)
  tp = transformers.pipeline("text-generation", model=pt, tokenizer=tok)
  inputs, kwargs = {"one_chat": (CHATS[0], {}), "chats": (CHATS, {}),
                    "new_text": (CHATS, dict(return_full_text=False)),
                    "continue_false": (CHATS[1], dict(continue_final_message=False))}[case]
  want = tp(inputs, **GREEDY, **kwargs)
  got = fp(inputs, **GREEDY, **kwargs)
  assert got == want
  if case == "one_chat":  # a new assistant message after the conversation
    assert got[0]["generated_text"][:-1] == CHATS[0] and got[0]["generated_text"][-1]["role"] == "assistant"
