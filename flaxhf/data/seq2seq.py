"""Translation and summarization data: (source, target) texts -> source ids and label ids.

As HF's run_translation.py / run_summarization.py: the source is `data.source_prefix` + text,
tokenized with the tokenizer's special tokens and truncated to `data.max_source_length`; the target
(`text_target=`) is truncated to `data.max_target_length` and becomes `labels`, padded with -100 by
the batcher. The decoder inputs are built from the labels on device (the model's
`shift_tokens_right`). mBART takes its language codes instead: "text </s> en_XX" for the source,
"text </s> ro_RO" for the labels (what MBartTokenizer's src_lang / tgt_lang produce), so the shifted
decoder input starts with the target code. With no validation data, `data.validation_split_percentage`
of the train rows (the first ones, as run_clm.py) are held out for evaluation.

Bad rows:
  translation   a row whose `translation` lacks the source or target language (or holds an empty
                text) is an error naming the row and the languages it has;
  summarization a row with an empty (or missing) summary is skipped, counted, and reported in one
                warning: such rows are common in scraped sets and teach the model to emit nothing. A
                split with no usable row is an error.
"""

import gzip
import logging
from typing import Any, List, Tuple

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData

log = logging.getLogger("flaxhf")

_CHUNK = 1000

# mBART-50's codes for the languages of the bundled data sets (data.*_lang_code overrides).
MBART_CODES = {"en": "en_XX", "ro": "ro_RO", "de": "de_DE", "fr": "fr_XX", "es": "es_XX"}


def translation_pairs(ds, cfg: Any, where: str) -> Tuple[List[str], List[str]]:
  """(sources, targets) from a `translation` column of {lang: text} rows; bad rows are errors."""
  src, tgt = get_option(cfg, "source_lang"), get_option(cfg, "target_lang")
  if not src or not tgt:
    raise DataError("Translation needs data.source_lang and data.target_lang (e.g. 'en', 'ro').")
  column = get_option(cfg, "translation_column", "translation")
  if column not in ds.column_names:
    raise DataError(f"{where} has no column {column!r}; columns: {ds.column_names}. Translation "
                    "rows look like {\"translation\": {\"en\": ..., \"ro\": ...}}.")
  sources_, targets = [], []
  for i, row in enumerate(sources.column_values(ds, column)):
    row = row or {}
    for lang in (src, tgt):
      text = row.get(lang)
      if not isinstance(text, str) or not text.strip():
        have = sorted(k for k, v in row.items() if isinstance(v, str) and v.strip())
        what = "source" if lang == src else "target"
        raise DataError(f"{where} row {i}: no {what} language {lang!r} text in {column!r} (it "
                        f"has {have}). Fix or drop the row, or set data.{what}_lang to a language "
                        "every row has.")
    sources_.append(row[src])
    targets.append(row[tgt])
  return sources_, targets


def summarization_pairs(ds, cfg: Any, where: str) -> Tuple[List[str], List[str]]:
  """(texts, summaries); rows with an empty summary are skipped and counted in a warning."""
  text_col = get_option(cfg, "text_column", "document")
  summary_col = get_option(cfg, "summary_column", "summary")
  for name, col in (("text_column", text_col), ("summary_column", summary_col)):
    if col not in ds.column_names:
      raise DataError(f"{where} has no column {col!r} (data.{name}); columns: {ds.column_names}. "
                      "DialogSum uses dialogue/summary, XSum document/summary.")
  texts, summaries, skipped = [], [], []
  for i, (text, summary) in enumerate(zip(sources.column_values(ds, text_col),
                                          sources.column_values(ds, summary_col))):
    if not isinstance(summary, str) or not summary.strip() or not isinstance(text, str):
      skipped.append(i)
      continue
    texts.append(text)
    summaries.append(summary)
  if skipped:
    log.warning("%s: skipped %d row(s) with an empty %r (first rows: %s).", where, len(skipped),
                summary_col, skipped[:5])
  if not texts:
    raise DataError(f"{where}: every row has an empty {summary_col!r}: nothing to learn or score.")
  return texts, summaries


def mbart_codes(cfg: Any, tokenizer) -> Tuple[int, int]:
  """(source, target) language-code ids; a code missing from the tokenizer is an error."""
  codes = {}
  for side in ("source", "target"):
    lang = get_option(cfg, f"{side}_lang")
    codes[side] = get_option(cfg, f"{side}_lang_code") or MBART_CODES.get(lang)
    if codes[side] is None:
      raise DataError(f"No mBART language code for data.{side}_lang={lang!r}: set "
                      f"data.{side}_lang_code (e.g. 'ro_RO').")
  ids = []
  for side, code in codes.items():
    token_id = tokenizer.convert_tokens_to_ids(code)
    if token_id is None or token_id == tokenizer.unk_token_id:
      raise DataError(f"mBART {side} language {code!r} is not a token of the tokenizer: use a "
                      "tokenizer that has it (launch/train_tokenizer.py --family mbart "
                      f"--lang_codes {codes['source']},{codes['target']}) or set "
                      f"data.{side}_lang_code to one it has.")
    ids.append(int(token_id))
  return ids[0], ids[1]


def tokenize(tokenizer, texts: List[str], max_length: int, target: bool = False,
             lang_code: int = None) -> List[np.ndarray]:
  """Ids of each text with the tokenizer's special tokens (mBART: text </s> code), truncated."""
  out = []
  for start in range(0, len(texts), _CHUNK):
    chunk = texts[start:start + _CHUNK]
    if lang_code is not None:  # mBART: no BOS; the language code follows EOS
      enc = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=max_length - 2,
                      return_attention_mask=False, verbose=False)["input_ids"]
      out.extend(np.asarray(r + [tokenizer.eos_token_id, lang_code], np.int32) for r in enc)
      continue
    kwargs = dict(text_target=chunk) if target else dict(text=chunk)
    enc = tokenizer(**kwargs, truncation=True, max_length=max_length, return_attention_mask=False,
                    verbose=False)["input_ids"]
    out.extend(np.asarray(r, np.int32) for r in enc)
  return out


def parallel_text_pairs(path: str, cfg: Any) -> Tuple[List[str], List[str]]:
  """(sources, targets) from line-aligned text files, `path` with "{lang}" = data.source_lang /
  data.target_lang (Multi30k's train.{lang}.gz; gzip read by suffix)."""
  langs = get_option(cfg, "source_lang"), get_option(cfg, "target_lang")
  if not all(langs):
    raise DataError("Translation needs data.source_lang and data.target_lang (e.g. 'de', 'en').")
  sides = []
  for lang in langs:
    name = path.format(lang=lang)
    try:
      with (gzip.open if name.endswith(".gz") else open)(name, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except FileNotFoundError as e:
      raise DataError(f"Parallel text file {name} not found (from {path} with {{lang}}={lang}).") from e
    while lines and not lines[-1].strip():
      lines.pop()
    sides.append(lines)
  (src, tgt), (a, b) = sides, (path.format(lang=l) for l in langs)
  if len(src) != len(tgt):
    raise DataError(f"Parallel files are not line-aligned: {a} has {len(src)} lines, {b} has "
                    f"{len(tgt)}.")
  for i, (s, t) in enumerate(zip(src, tgt)):
    if not s.strip() or not t.strip():
      raise DataError(f"{a if not s.strip() else b} line {i + 1} is empty: parallel files need a "
                      "text on every line. Fix or drop that line in both files.")
  return src, tgt


def load_texts(cfg: Any, pairs) -> dict:
  """(sources, targets) per role: parallel text files for data.*_file paths holding "{lang}",
  else the datasets source (local files, TFDS or the hub) through `pairs`."""
  files = {role: get_option(cfg, f"{role}_file") for role in sources.ROLES}
  if not any(f and "{lang}" in f for f in files.values()):
    return {role: pairs(ds, cfg, sources.describe(cfg, role))
            for role, ds in sources.load_splits(cfg).items()}
  if pairs is not translation_pairs:
    raise DataError("Paths with {lang} (line-aligned parallel text files) are for translation; "
                    "summarization reads csv / json lines with text and summary columns.")
  return {role: parallel_text_pairs(f, cfg) if "{lang}" in f
          else pairs(sources.read_file(f), cfg, sources.describe(cfg, role))
          for role, f in files.items() if f}


def held_out_rows(num_rows: int, percent: float) -> int:
  """How many of the first train rows data.validation_split_percentage holds out (as run_clm.py)."""
  n = max(1, int(round(num_rows * percent / 100)))
  if n >= num_rows:
    raise DataError(f"Cannot hold out {percent}% of {num_rows} train rows: set "
                    "data.validation_file or lower data.validation_split_percentage.")
  return n


def prepare_seq2seq(data_cfg: Any, tokenizer, kind: str, mbart: bool = False) -> TaskData:
  """Loads and tokenizes the (source, target) pairs of `kind` ("translation" | "summarization")."""
  pairs = {"translation": translation_pairs, "summarization": summarization_pairs}[kind]
  prefix = get_option(data_cfg, "source_prefix", "")
  max_source = int(get_option(data_cfg, "max_source_length", 128))
  max_target = int(get_option(data_cfg, "max_target_length", 128))
  codes = mbart_codes(data_cfg, tokenizer) if mbart else (None, None)
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  texts = load_texts(data_cfg, pairs)
  percent = float(get_option(data_cfg, "validation_split_percentage", 0))
  if "validation" not in texts and "train" in texts and percent > 0:
    n = held_out_rows(len(texts["train"][0]), percent)
    src, tgt = texts["train"]
    texts = {"train": (src[n:], tgt[n:]), "validation": (src[:n], tgt[:n])}
  examples, raw = {}, {}
  for role, (src, tgt) in texts.items():
    if limits[role] is not None:
      src, tgt = src[:int(limits[role])], tgt[:int(limits[role])]
    input_ids = tokenize(tokenizer, [prefix + s for s in src], max_source, lang_code=codes[0])
    labels = tokenize(tokenizer, tgt, max_target, target=True, lang_code=codes[1])
    examples[role] = Examples(seqs={"input_ids": input_ids, "labels": labels}, values={})
    raw[role] = {"sources": src, "targets": tgt}
    log.info("%s %s: %d pairs; source %.1f / target %.1f tokens on average.", kind, role,
             len(src), np.mean([len(a) for a in input_ids]), np.mean([len(a) for a in labels]))
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    raise ValueError(f"{type(tokenizer).__name__} has no pad token: seq2seq batches need one "
                     "(launch/train_tokenizer.py makes <pad> id 0 for T5/Marian, 1 for BART).")
  return TaskData(train=examples.get("train"), eval=examples.get("validation"), label_list=None,
                  num_labels=0, problem_type=kind, eval_raw=raw.get("validation"),
                  pad_values={"input_ids": int(pad_id), "labels": -100})

