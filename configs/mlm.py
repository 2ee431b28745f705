"""Masked language modelling: `--config configs/mlm.py[:ARGS]`.

ARGS, comma-separated: `local` (the offline MiniLM checkpoint and WikiText-2 under $FLAXHF_DATA,
default ../shared/data; its train split is not there, so it trains on wiki.valid.tokens and evaluates
on wiki.test.tokens), `wwm` (whole-word masking), `line_by_line` (one example per text line, not
`max_length` blocks), `scratch` (random init from the model's config; its tokenizer is kept),
`streaming` (read the train texts lazily: needs train.steps and a validation file or split),
`smoke` (a run of seconds), `model=NAME_OR_PATH`, `steps=N`. The hub default is wikitext-2-raw-v1,
as in HF's run_mlm.py example.
"""

import os

from configs import common

WIKITEXT_DIR = os.path.join(common.DATA_DIR, "language_modeling", "wikitext-2-v1")


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.base_config("masked_lm")
  c.data.dataset = "wikitext"
  c.data.subset = "wikitext-2-raw-v1"
  c.data.text_column = "text"         # for json/csv files and hub data; other files: one text a line
  c.data.line_by_line = "line_by_line" in flags
  c.data.mlm_probability = 0.15
  c.data.whole_word_mask = "wwm" in flags
  # Read the train texts lazily, for data bigger than memory (needs train.steps; the eval data is
  # still read in full). Blocks come in file order, shuffled within each chunk of texts.
  c.data.streaming = "streaming" in flags
  c.data.stream_shuffle = True         # shuffle the examples within each chunk of texts
  c.data.stream_chunk_texts = 1000     # texts read, tokenized and grouped at a time
  c.model.from_scratch = "scratch" in flags
  c.train.learning_rate = 5e-5
  if "local" in flags:
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = os.path.join(WIKITEXT_DIR, "wiki.valid.tokens")
    c.data.validation_file = os.path.join(WIKITEXT_DIR, "wiki.test.tokens")
    c.data.max_eval_samples = 512  # blocks: a steady perplexity at a fraction of the eval time
    c.train.steps = 300
    c.train.learning_rate = 1e-4
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
  common.apply_common_args(c, flags, values,
                           known_flags=("wwm", "line_by_line", "scratch", "streaming"))
  c.lock()
  return c
