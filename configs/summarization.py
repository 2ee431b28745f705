"""Summarization (HF's run_summarization.py): `--config configs/summarization.py[:ARGS]`.

ARGS, comma-separated:
  local         offline: a small model from scratch (family=, default bart) with a 4000-token tokenizer
                trained on the first 4000 train dialogues and summaries, on DialogSum under
                $FLAXHF_DATA (default ../shared/data): train on its train split, evaluate on dev.
  xsum          the XSum-style sample (document/summary JSON lines) under hf_tests_samples/xsum, for
                both splits (10 rows: a format check, not a benchmark).
  family=NAME   t5 | bart | marian: the from-scratch model type and tokenizer layout (local).
  scratch       random init from the checkpoint's config (its tokenizer kept).
  smoke         a run of seconds; model=NAME_OR_PATH (a checkpoint to fine-tune); steps=N.
The hub default is google-t5/t5-small on XSum with T5's "summarize: " prefix.

data.text_column / data.summary_column name the columns (DialogSum: dialogue/summary). A row with
an empty summary is skipped and counted in a warning. Eval generates with eval.* and scores
ROUGE-1/2/L/Lsum (rouge-score, Porter stemming; Lsum over Punkt-split sentences, offline).
"""

import os

from configs import common

DIALOGSUM = os.path.join(common.DATA_DIR, "summarization", "dialogsum")
XSUM_SAMPLE = os.path.join(common.DATA_DIR, "hf_tests_samples", "xsum", "sample.json")


def _local_data(c):
  c.data.dataset = None
  c.data.subset = None
  c.data.train_file = os.path.join(DIALOGSUM, "dialogsum.train.jsonl")
  c.data.validation_file = os.path.join(DIALOGSUM, "dialogsum.dev.jsonl")
  c.data.text_column = "dialogue"
  c.data.summary_column = "summary"
  c.data.source_prefix = ""
  # Dialogues average ~180 tokens and summaries ~30: 256 / 64 keep most of both.
  c.data.max_source_length = c.data.max_length = 256
  c.data.max_target_length = 64
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.steps = 2000
  c.train.eval_every = 500
  c.checkpoint.every_steps = 500
  c.eval.max_new_tokens = 64


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.seq2seq_base("summarization")
  c.model.name_or_path = "google-t5/t5-small"
  c.model.from_scratch = "scratch" in flags
  c.data.dataset = "EdinburghNLP/xsum"
  c.data.text_column = "document"
  c.data.summary_column = "summary"
  c.data.source_prefix = "summarize: "
  c.data.max_source_length = 1024
  c.data.max_target_length = 128
  c.data.max_length = 1024
  common.apply_seq2seq_args(
      c, flags, values, known_flags=("xsum", "scratch"), local_data=_local_data,
      tokenizer_fields=lambda c: [c.data.text_column, c.data.summary_column])
  if "xsum" in flags:
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = c.data.validation_file = XSUM_SAMPLE
    c.data.text_column = "document"
    c.data.summary_column = "summary"
  c.lock()
  return c
