"""Causal LM on the engine: run_clm's grouping, per-document masks, GPT-2 loss parity, real runs."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxhf.data import clm as clm_data
from flaxhf.data.sources import DataError
from flaxhf.models.losses import IGNORE_INDEX
from flaxhf.train import engine
from flaxhf.train.tasks_clm import clm_labels, document_mask_and_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEXT = """The quick brown fox jumps over the lazy dog.
It was the best of times, it was the worst of times.

Call me Ishmael. Some years ago, never mind how long precisely,
having little or no money in my purse, I thought I would sail about.

All happy families are alike; each unhappy family is unhappy in its own way.
In a hole in the ground there lived a hobbit.
"""


@pytest.fixture(scope="module")
def tokenizer():
  import transformers
  return transformers.AutoTokenizer.from_pretrained(clm_data.gpt2_tokenizer_dir())


def run_clm_group_texts(examples, block_size):
  """transformers/examples/pytorch/language-modeling/run_clm.py's group_texts, verbatim."""
  concatenated_examples = {k: list(itertools.chain(*examples[k])) for k in examples.keys()}
  total_length = len(concatenated_examples[list(examples.keys())[0]])
  total_length = (total_length // block_size) * block_size
  result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()}
  result["labels"] = result["input_ids"].copy()
  return result


# ---- data ----------------------------------------------------------------------------------------

def test_gpt2_tokenizer_from_the_bpe_files(tmp_path, tokenizer):
  path = clm_data.gpt2_tokenizer_dir(str(tmp_path))
  assert clm_data.gpt2_tokenizer_dir(str(tmp_path)) == path  # built once, then reused
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(path)
  assert len(tok) == 50257 and tok.eos_token == tok.bos_token == "<|endoftext|>"
  assert tok.eos_token_id == 50256
  # GPT-2's own ids (openai-community/gpt2), and no special tokens added.
  assert tok("Hello world")["input_ids"] == [15496, 995]
  assert tok(" The quick brown fox.\n")["input_ids"] == [383, 2068, 7586, 21831, 13, 198]
  assert tok.decode(tok(TEXT)["input_ids"]) == TEXT


@pytest.mark.parametrize("add_eos", [False, True])
@pytest.mark.parametrize("block", [7, 16])
def test_blocks_equal_run_clm_group_texts(tmp_path, tokenizer, add_eos, block):
  path = tmp_path / "train.txt"
  path.write_text(TEXT)
  data = clm_data.prepare_clm({"train_file": str(path), "block_size": block, "add_eos": add_eos,
                               "per_document_attention": True}, tokenizer)
  texts = [line for line in TEXT.split("\n") if line.strip()]
  enc = tokenizer(texts)  # run_clm's tokenize_function
  if add_eos:  # what data.add_eos adds: every document ends with EOS
    enc = {k: [row + [v] for row in enc[k]] for k, v in (("input_ids", 50256), ("attention_mask", 1))}
  want = run_clm_group_texts(dict(enc), block)
  assert len(want["input_ids"]) == len(data.train) > 3
  np.testing.assert_array_equal(np.stack(data.train.seqs["input_ids"]), want["input_ids"])
  # Every block is full (no padding), and its labels are its ids (the loss shifts).
  assert np.all(np.asarray(want["attention_mask"]) == 1) and want["labels"] == want["input_ids"]
  # Document ids count documents within each block, from 0.
  flat_doc = np.repeat(np.arange(len(texts)), [len(r) for r in enc["input_ids"]])
  for i, d in enumerate(data.train.seqs["document_ids"]):
    doc = flat_doc[i * block:(i + 1) * block]
    np.testing.assert_array_equal(d, doc - doc[0])
  assert data.pad_values["document_ids"] == -1
  assert data.eval is None  # validation_split_percentage unset here: nothing held out


def test_text_units_and_held_out_split(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("\n\nA: one\ntwo\n\n\nB: three\r\n\nC: four\n\n")
  assert clm_data.read_text_file(path, "line") == ["A: one", "two", "B: three", "C: four"]
  assert clm_data.read_text_file(path, "paragraph") == ["A: one\ntwo", "B: three", "C: four"]
  assert clm_data.read_text_file(path, "file") == ["A: one\ntwo\n\n\nB: three\n\nC: four"]
  with pytest.raises(ValueError, match="text_unit"):
    clm_data.read_text_file(path, "sentence")
  texts = clm_data.load_texts({"train_file": str(path), "text_unit": "paragraph",
                               "validation_split_percentage": 34})
  assert texts == {"train": ["B: three", "C: four"], "validation": ["A: one\ntwo"]}  # the first, as run_clm
  with pytest.raises(DataError, match="validation_file"):
    clm_data.load_texts({"train_file": str(path), "text_unit": "file",
                         "validation_split_percentage": 5})
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"body": "hello world"}\n{"body": ""}\n{"body": "more text"}\n')
  assert clm_data.load_texts({"train_file": str(rows), "text_column": "body"}) == {
      "train": ["hello world", "more text"]}


def test_per_document_mask_positions_and_labels():
  doc = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2],    # three documents
                   [0, 0, 0, 0, 0, 0, 0, 0],    # one document across the whole block
                   [-1, -1, -1, -1, -1, -1, -1, -1]])  # an eval dummy row
  attn = jnp.array([[1] * 8, [1] * 8, [1] + [0] * 7])
  ids = jnp.arange(24).reshape(3, 8) + 100
  mask, pos = document_mask_and_positions(doc, attn)
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8)), list(range(8))])
  want0 = np.zeros((8, 8), int)
  for lo, hi in ((0, 3), (3, 5), (5, 8)):
    want0[lo:hi, lo:hi] = 1  # block diagonal: the model adds causality
  np.testing.assert_array_equal(mask[0], want0)
  np.testing.assert_array_equal(mask[1], np.ones((8, 8)))
  np.testing.assert_array_equal(mask[2], np.tile([1] + [0] * 7, (8, 1)))  # no row fully masked
  labels = clm_labels(ids, attn, doc)
  # No label where a document starts: that token would be predicted from the previous document.
  np.testing.assert_array_equal(labels[0], [100, 101, 102, -100, 104, -100, 106, 107])
  np.testing.assert_array_equal(labels[1], ids[1])
  np.testing.assert_array_equal(labels[2], [116] + [-100] * 7)
  np.testing.assert_array_equal(clm_labels(ids, attn), jnp.where(attn > 0, ids, IGNORE_INDEX))
