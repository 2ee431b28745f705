"""Masked language modelling data: texts -> tokens -> `max_length` blocks (or one example per line).

Texts come from local files (.json/.jsonl/.csv/.tsv with a text column, any other extension as plain
text with one text per line) or a hub/TFDS data set's text column; blank texts are skipped. As HF's
run_mlm.py, every text is tokenized with its special tokens and the token stream is cut into blocks
of `max_length` (the ragged tail of a split is dropped), or with `data.line_by_line` each text is one
example, truncated to `max_length`.

For whole-word masking each example also carries `word_ids`: for every token, the index of the word
it belongs to within the example (0, 1, 2, ... in order; -1 for special tokens). Words are those of
the fast tokenizer's pre-tokenizer (`BatchEncoding.word_ids`: whitespace and punctuation splits for
BERT's WordPiece, space-prefixed words for byte-level BPE), so every sub-token of a word shares an
index, and a word cut by a block boundary counts as one word in each block.

With `data.streaming` the train texts are read lazily (this process's share of them) and made into
the same blocks chunk by chunk (`group_stream` carries each chunk's remainder into the next); the
validation data is read in full, as without streaming. See flaxhf.data.clm for the options.
"""

import logging
import pathlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples, ExampleStream
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData

log = logging.getLogger("flaxhf")

_CHUNK = 1000


def read_text_file(path: str) -> List[str]:
  """The non-blank lines of a plain text file (one text per line)."""
  texts = list(sources.iter_text_file(path, "line"))
  if not texts:
    raise DataError(f"Text file {path} is empty (no non-blank line): masked LM needs text.")
  return texts


def load_texts(cfg: Any) -> Dict[str, List[str]]:
  """Non-blank texts per role ("train", "validation") from local files or a hub/TFDS data set."""
  column = get_option(cfg, "text_column", "text")
  files = {role: get_option(cfg, f"{role}_file") for role in sources.ROLES}
  if any(files.values()):
    raw = {}
    for role, path in files.items():
      if not path:
        continue
      if pathlib.Path(path).suffix.lower() in sources.FORMATS:
        raw[role] = _column_texts(sources.read_file(path), column, path)
      else:
        raw[role] = read_text_file(path)
  else:
    raw = {role: _column_texts(ds, column, sources.describe(cfg, role))
           for role, ds in sources.load_splits(cfg).items()}
  return raw


def stream_eval_texts(cfg: Any, what: str, unit: str = "line") -> Dict[str, List[str]]:
  """With data.streaming: the validation texts, read in full ({} when there are none); none is
  held out of a stream, whose length is unknown."""
  column = get_option(cfg, "text_column", "text")
  has_file = get_option(cfg, "validation_file")
  from_hub = (not get_option(cfg, "train_file") and get_option(cfg, "dataset")
              and get_option(cfg, "validation_split", "validation"))
  if has_file or from_hub:
    texts = list(sources.stream_texts(cfg, "validation", column=column, unit=unit).iterate())
    if not texts:
      raise DataError(f"The validation data {sources.describe(cfg, 'validation')} has no "
                      f"non-blank text: {what} evaluates on text.")
    return {"validation": texts}
  percent = float(get_option(cfg, "validation_split_percentage", 0))
  if percent > 0:
    raise DataError(f"data.streaming=True cannot hold data.validation_split_percentage={percent}% "
                    "of a stream out (its length is unknown): set data.validation_file (or "
                    "data.validation_split for a hub data set), or "
                    "data.validation_split_percentage=0 to train without evaluation.")
  return {}


def train_stream(cfg: Any, encode, max_examples, *, column: str, unit: str, process_index: int,
                 process_count: int) -> ExampleStream:
  """This process's share of the train texts as an ExampleStream (data.stream_shuffle: within
  chunks of data.stream_chunk_texts texts); data.max_train_samples caps the examples of an epoch
  over all processes."""
  share = sources.stream_texts(cfg, "train", column=column, unit=unit,
                               process_index=process_index, process_count=process_count)
  cap = None if max_examples is None else max(1, int(max_examples) // process_count)
  return ExampleStream(share, encode, chunk_texts=int(get_option(cfg, "stream_chunk_texts", 1000)),
                       shuffle=bool(get_option(cfg, "stream_shuffle", False)), max_examples=cap,
                       where=f"The train data {sources.describe(cfg, 'train')}")


def _column_texts(ds, column: str, where: str) -> List[str]:
  if column not in ds.column_names:
    raise DataError(f"{where} has no text column {column!r}; columns: {ds.column_names} (set "
                    "data.text_column).")
  texts = [t for t in sources.column_values(ds, column) if t and str(t).strip()]
  if not texts:
    raise DataError(f"{where} has no non-blank text in column {column!r}.")
  return texts


def dense_word_ids(word_ids_XxL: np.ndarray) -> np.ndarray:
  """Renumbers word ids per row as 0, 1, 2, ... in order of appearance; -1 (no word) stays -1."""
  w = np.asarray(word_ids_XxL)
  valid = w >= 0
  prev = np.concatenate([np.full(w.shape[:-1] + (1,), -1, w.dtype), w[..., :-1]], axis=-1)
  new_word = valid & ((w != prev) | ~np.concatenate(
      [np.zeros(w.shape[:-1] + (1,), bool), valid[..., :-1]], axis=-1))
  return np.where(valid, np.cumsum(new_word, axis=-1) - 1, -1).astype(np.int32)


def tokenize_texts(tokenizer, texts: List[str], with_word_ids: bool,
                   max_length=None) -> Tuple[List[np.ndarray], List[np.ndarray]]:
  """Token ids of each text (with special tokens) and, if asked, its word ids (-1 for specials)."""
  if with_word_ids and not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: whole-word masking needs word "
                     "ids, which only fast (Rust) tokenizers give. Load it with use_fast=True.")
  ids, words = [], []
  kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
  for start in range(0, len(texts), _CHUNK):
    enc = tokenizer(texts[start:start + _CHUNK], return_attention_mask=False,
                    return_token_type_ids=False, verbose=False, **kwargs)
    for i, row in enumerate(enc["input_ids"]):
      ids.append(np.asarray(row, np.int32))
      if with_word_ids:
        words.append(np.asarray([-1 if w is None else w for w in enc.word_ids(i)], np.int32))
  return ids, words


def group_texts(ids: List[np.ndarray], block: int, word_ids: List[np.ndarray] = None):
  """run_mlm.py's group_texts: (ids [N, block], word ids [N, block] or None); the tail is dropped."""
  seqs, _ = group_stream(ids, block, word_ids=word_ids)
  return seqs["input_ids"], seqs.get("word_ids")


def group_stream(ids: List[np.ndarray], block: int, carry: Optional[Dict[str, np.ndarray]] = None,
                 word_ids: Optional[List[np.ndarray]] = None, tag: str = "word_ids"):
  """group_texts for a stream read chunk by chunk: (seqs, carry). `carry` (what an earlier chunk
  left short of a block) goes first and the new remainder is returned, so chunk after chunk cuts
  exactly the blocks of the whole stream. `word_ids` (per text, -1 for none) become `seqs[tag]`,
  made unique across texts before cutting and renumbered within each block."""
  empty = np.zeros((0,), np.int32)
  carry = carry or {}
  flat = np.concatenate([carry.get("input_ids", empty)] + list(ids)).astype(np.int32)
  n = len(flat) // block
  seqs = {"input_ids": flat[:n * block].reshape(n, block)}
  rest = {"input_ids": flat[n * block:]}
  if word_ids is not None:
    shifted = [carry.get(tag, empty)]
    offset = int(shifted[0].max()) + 1 if len(shifted[0]) and shifted[0].max() >= 0 else 0
    for w in word_ids:
      shifted.append(np.where(w >= 0, w + offset, -1))
      offset += int(w.max()) + 1 if len(w) and w.max() >= 0 else 0
    flat_w = np.concatenate(shifted).astype(np.int32)
    seqs[tag] = dense_word_ids(flat_w[:n * block].reshape(n, block))
    rest[tag] = dense_word_ids(flat_w[n * block:])  # small numbers: the carry is saved as JSON
  return seqs, rest


def mlm_encoder(tokenizer, block: int, line_by_line: bool, wwm: bool):
  """encode(texts, carry) -> (seqs, carry) for a stream: one chunk of texts as blocks (or lines)."""
  def encode(texts, carry):
    ids, words = tokenize_texts(tokenizer, texts, wwm, max_length=block if line_by_line else None)
    if line_by_line:
      seqs = {"input_ids": ids}
      if wwm:
        seqs["word_ids"] = [dense_word_ids(w) for w in words]
      return seqs, None
    return group_stream(ids, block, carry, words if wwm else None)
  return encode


def prepare_mlm(data_cfg: Any, tokenizer, process_index: int = 0,
                process_count: int = 1) -> TaskData:
  """Loads and tokenizes the texts into blocks (or lines) of at most `data.max_length` tokens;
  with `data.streaming` the train texts are read and tokenized on the fly (this process's share)."""
  if tokenizer.mask_token_id is None:
    raise ValueError(f"{type(tokenizer).__name__} has no mask token: masked LM needs one.")
  block = int(get_option(data_cfg, "max_length", 128))
  line_by_line = bool(get_option(data_cfg, "line_by_line", False))
  wwm = bool(get_option(data_cfg, "whole_word_mask", False))
  if wwm and not getattr(tokenizer, "is_fast", False):
    tokenize_texts(tokenizer, [], True)  # the slow-tokenizer error, before any data is read
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  streaming = bool(get_option(data_cfg, "streaming", False))
  if streaming:
    raw = stream_eval_texts(data_cfg, "masked LM")
  else:
    raw = load_texts(data_cfg)
  examples = {}
  for role, texts in raw.items():
    limit = limits[role]
    if line_by_line and limit is not None:
      texts = texts[:int(limit)]
    ids, words = tokenize_texts(tokenizer, texts, wwm, max_length=block if line_by_line else None)
    if line_by_line:
      seqs = {"input_ids": ids}
      if wwm:
        seqs["word_ids"] = [dense_word_ids(w) for w in words]
    else:
      blocks, word_blocks = group_texts(ids, block, words if wwm else None)
      if len(blocks) == 0:
        raise DataError(f"The {role} data {sources.describe(data_cfg, role)} has "
                        f"{sum(map(len, ids))} tokens: fewer than one block of data.max_length="
                        f"{block}. Lower data.max_length or use data.line_by_line=True.")
      if limit is not None:  # counted in blocks, as run_mlm.py
        blocks = blocks[:int(limit)]
        word_blocks = None if word_blocks is None else word_blocks[:int(limit)]
      seqs = {"input_ids": list(blocks)}
      if wwm:
        seqs["word_ids"] = list(word_blocks)
    examples[role] = Examples(seqs=seqs, values={})
    log.info("Masked LM %s: %d texts -> %d examples.", role, len(texts), len(examples[role]))
  if streaming:
    examples["train"] = train_stream(
        data_cfg, mlm_encoder(tokenizer, block, line_by_line, wwm), limits["train"],
        column=get_option(data_cfg, "text_column", "text"), unit="line",
        process_index=process_index, process_count=process_count)
  pad_id = tokenizer.pad_token_id
  return TaskData(train=examples.get("train"), eval=examples.get("validation"), label_list=None,
                  num_labels=0, problem_type="masked_lm",
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id), "word_ids": -1})
