"""Translation (HF's run_translation.py): `--config configs/translation.py[:ARGS]`.

ARGS, comma-separated:
  local         offline: a small model from scratch (family=, default bart) with a 4000-token tokenizer
                trained on the train text, on Tatoeba en-ro under $FLAXHF_DATA (default
                ../shared/data); its first 5% of rows are held out for evaluation (the tokenizer never
                sees them).
  newstest      with local: evaluate on WMT16 newstest2016 en-ro (1999 news sentences) instead.
  multi30k      with local: Multi30k de-en instead (29000 image captions, line-aligned
                train.{lang}.gz files; evaluated on its 1014 validation captions).
  family=NAME   t5 | bart | marian: the from-scratch model type and tokenizer layout (local).
  scratch       random init from the checkpoint's config (its tokenizer kept).
  smoke         a run of seconds; model=NAME_OR_PATH (a checkpoint to fine-tune); steps=N.
The hub default is google-t5/t5-small on wmt16 ro-en with T5's "translate English to Romanian: "
prefix, as the run_translation.py README.

Rows are {"translation": {"en": ..., "ro": ...}}, or a data.*_file path with "{lang}" names
line-aligned parallel text files (gzip by suffix): data.source_lang / data.target_lang pick the pair;
mBART also takes data.source_lang_code / data.target_lang_code (default en_XX, ro_RO, ...). Eval
generates with eval.* (num_beams, max_new_tokens, ...) and scores BLEU and chrF (sacrebleu).
"""

import os

from configs import common

TATOEBA = os.path.join(common.DATA_DIR, "translation", "tatoeba_en_ro", "train.json")
NEWSTEST = os.path.join(common.DATA_DIR, "translation", "wmt16_en_ro", "test.json")
MULTI30K = os.path.join(common.DATA_DIR, "translation", "multi30k_de_en", "{split}.{{lang}}.gz")


def _local_data(c, newstest: bool, multi30k: bool):
  c.data.dataset = None
  c.data.subset = None
  c.data.train_file = TATOEBA
  c.data.validation_split_percentage = 5.0
  c.data.source_prefix = ""
  # Tatoeba's sentences are short (~6 words): 64 tokens hold all but a few.
  c.data.max_source_length = c.data.max_target_length = c.data.max_length = 64
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.steps = 2000
  c.train.eval_every = 500
  c.checkpoint.every_steps = 500
  c.eval.max_new_tokens = 64
  if multi30k:  # captions: ~12 words
    c.data.train_file = MULTI30K.format(split="train")
    c.data.validation_file = MULTI30K.format(split="val")
    c.data.validation_split_percentage = 0.0
    c.data.source_lang, c.data.target_lang = "de", "en"
  if newstest:  # news sentences are longer
    c.data.validation_file = NEWSTEST
    c.data.validation_split_percentage = 0.0
    c.data.max_source_length = c.data.max_target_length = c.data.max_length = 128
    c.eval.max_new_tokens = 128


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.seq2seq_base("translation")
  c.model.name_or_path = "google-t5/t5-small"
  c.model.from_scratch = "scratch" in flags
  c.data.dataset = "wmt16"
  c.data.subset = "ro-en"
  c.data.translation_column = "translation"
  c.data.source_lang = "en"
  c.data.target_lang = "ro"
  c.data.source_lang_code = None  # mBART only: the language-code tokens (default from *_lang)
  c.data.target_lang_code = None
  c.data.source_prefix = "translate English to Romanian: "
  c.data.max_source_length = 1024
  c.data.max_target_length = 128
  c.data.max_length = 1024
  for flag in ("newstest", "multi30k"):
    if flag in flags and "local" not in flags:
      raise common.ConfigError(f"{flag} is a variant of the local run: use local,{flag}.")
  if {"newstest", "multi30k"} <= flags:
    raise common.ConfigError("newstest evaluates the en-ro run; multi30k is de-en: pick one.")
  common.apply_seq2seq_args(
      c, flags, values, known_flags=("newstest", "multi30k", "scratch"),
      local_data=lambda c: _local_data(c, "newstest" in flags, "multi30k" in flags),
      tokenizer_fields=lambda c: [f"translation.{c.data.source_lang}",
                                  f"translation.{c.data.target_lang}"])
  c.lock()
  return c
