"""Token classification (NER) data: CoNLL files or token/tag columns -> sub-token-aligned Examples.

Labels sit on the first sub-token of each word; the other sub-tokens get -100 (ignored by the loss)
unless `data.label_all_tokens`, which labels them too, a B- tag continuing as its I- tag (as
transformers' run_ner does). Words that a truncation cuts off, or that tokenize to nothing, are
neither trained on nor scored (as run_ner); `prepare` logs how many there are. A tag outside the
label list (the train split's tags, ClassLabel names or data.label_list) is an error naming it.
"""

import dataclasses
import logging
import pathlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData
from flaxhf.models.losses import IGNORE_INDEX

log = logging.getLogger("flaxhf")

# Files with these extensions are CoNLL columns (`token ... tag`); other files go to `sources`.
CONLL_SUFFIXES = (".txt", ".conll", ".iob", ".iob2", ".bio")

PROBLEM_TYPE = "token_classification"

_TOKENIZE_CHUNK = 1024


@dataclasses.dataclass
class WordTags:
  """Eval-side word alignment: per example the first sub-token of each scored word and its tag."""

  starts: List[np.ndarray]  # int32 [words kept]: sub-token position of each scored word
  tags: List[List[str]]  # the true tag of each scored word
  dropped_words: int = 0  # words cut by truncation or tokenized to nothing (not scored)


def read_conll(path: str) -> Tuple[List[List[str]], List[List[str]]]:
  """(tokens, tags) per sentence from CoNLL columns: token first, tag LAST; -DOCSTART- skipped."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"Data file not found: {path}")
  tokens, tags, words, labels = [], [], [], []
  with open(path, encoding="utf-8-sig") as f:
    for lineno, line in enumerate(f, 1):
      fields = line.split()
      if not fields or fields[0] == "-DOCSTART-":
        if words:
          tokens.append(words)
          tags.append(labels)
        words, labels = [], []
        continue
      if len(fields) < 2:
        raise DataError(f"{path}:{lineno}: expected CoNLL columns `token ... tag`, got "
                        f"{line.strip()!r}.")
      words.append(fields[0])
      labels.append(fields[-1])
  if words:  # the last sentence may lack a closing blank line
    tokens.append(words)
    tags.append(labels)
  if not tokens:
    raise DataError(f"Data file {path} holds no sentences.")
  return tokens, tags


def load_tagged(cfg: Any) -> Tuple[Dict[str, Tuple[list, list]], Optional[list]]:
  """Raw splits as role -> (tokens, tags) lists, and the tag names a ClassLabel feature gives."""
  files = {role: get_option(cfg, f"{role}_file") for role in sources.ROLES}
  conll = {r: p for r, p in files.items() if p and pathlib.Path(p).suffix.lower() in CONLL_SUFFIXES}
  splits = {role: read_conll(path) for role, path in conll.items()}
  others = {r: p for r, p in files.items() if p and r not in conll}
  if others:
    raw = {role: sources.read_file(path) for role, path in others.items()}
  elif not conll:
    raw = sources.load_splits(cfg)
  else:
    raw = {}
  tokens_column = get_option(cfg, "tokens_column", "tokens")
  tags_column = get_option(cfg, "tags_column", "ner_tags")
  names = None
  for role, ds in raw.items():
    for column, option in ((tokens_column, "tokens_column"), (tags_column, "tags_column")):
      if column not in ds.column_names:
        raise DataError(f"The {role} data {sources.describe(cfg, role)} has no column {column!r} "
                        f"(columns: {ds.column_names}); set data.{option}.")
    inner = getattr(ds.features[tags_column], "feature", None)  # List(ClassLabel) on the hub
    if sources.is_class_label(inner):
      names = list(inner.names)
    splits[role] = (sources.column_values(ds, tokens_column),
                    sources.column_values(ds, tags_column))
  for role, (tokens, tags) in splits.items():
    for i, (words, labels) in enumerate(zip(tokens, tags)):
      if words is None or labels is None or len(words) != len(labels):
        raise DataError(f"The {role} data {sources.describe(cfg, role)}, row {i}: "
                        f"{0 if words is None else len(words)} tokens but "
                        f"{0 if labels is None else len(labels)} tags.")
  return splits, names


def label_space(splits, class_names: Optional[list], cfg: Any) -> List[str]:
  """The tag names: data.label_list, else ClassLabel names, else the sorted tags of train."""
  given = get_option(cfg, "label_list")
  if isinstance(given, str):
    given = [s.strip() for s in given.split(",") if s.strip()]
  if given:
    return [str(g) for g in given]
  if class_names:
    return class_names
  tags = splits["train"][1] if "train" in splits else next(iter(splits.values()))[1]
  found = {t for row in tags for t in row}
  if any(isinstance(t, (int, np.integer)) for t in found):
    raise DataError("The tags are integers with no names: set data.label_list (comma-separated "
                    "names, in id order).")
  return sorted(found)


def tag_names(tags: List[list], label_list: List[str], role: str, where: str,
              id_names: Optional[List[str]] = None) -> List[List[str]]:
  """Tags as names (integers index id_names, else label_list); an unknown tag is an error."""
  known, id_names = set(label_list), id_names or label_list
  names, unknown = [], set()
  for row in tags:
    out = []
    for t in row:
      if isinstance(t, (int, np.integer)) and not isinstance(t, bool):
        t = id_names[t] if 0 <= t < len(id_names) else t
      if t not in known:
        unknown.add(t)
      out.append(t)
    names.append(out)
  if unknown:
    raise DataError(f"The {role} data {where} has tag(s) {sorted(unknown, key=str)[:10]} not among "
                    f"the known labels {label_list} (from the train split or data.label_list).")
  return names


def align_labels(word_ids: Sequence[Optional[int]], word_label_ids: Sequence[int],
                 label_all_tokens: bool, b_to_i: Sequence[int]) -> np.ndarray:
  """Sub-token labels [L]: the first sub-token of a word gets its label, others -100 or I-."""
  out = np.full(len(word_ids), IGNORE_INDEX, np.int32)
  prev = None
  for pos, w in enumerate(word_ids):
    if w is not None:
      if w != prev:
        out[pos] = word_label_ids[w]
      elif label_all_tokens:
        out[pos] = b_to_i[word_label_ids[w]]
    prev = w
  return out


def first_subtokens(word_ids: Sequence[Optional[int]]) -> Tuple[np.ndarray, np.ndarray]:
  """(positions, word indices) of the first sub-token of every word that kept one."""
  pos, words, prev = [], [], None
  for p, w in enumerate(word_ids):
    if w is not None and w != prev:
      pos.append(p)
      words.append(w)
    prev = w
  return np.asarray(pos, np.int32), np.asarray(words, np.int64)


def prepare_token_classification(data_cfg: Any, tokenizer) -> TaskData:
  """Loads, labels and tokenizes the configured splits (is_split_into_words, truncated)."""
  if not getattr(tokenizer, "is_fast", False):
    raise DataError(f"Token classification aligns labels with word_ids(), which needs a fast "
                    f"tokenizer; {type(tokenizer).__name__} is not one.")
  splits, class_names = load_tagged(data_cfg)
  # The label list comes from the FULL train split: a max_train_samples subsample may miss a tag.
  label_list = label_space(splits, class_names, data_cfg)
  index = {t: i for i, t in enumerate(label_list)}
  b_to_i = [index.get("I-" + t[2:], i) if t.startswith("B-") else i
            for i, t in enumerate(label_list)]
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  max_length = int(get_option(data_cfg, "max_length", min(tokenizer.model_max_length, 512)))
  label_all = bool(get_option(data_cfg, "label_all_tokens", False))
  examples, word_tags = {}, None
  for role, (tokens, tags) in splits.items():
    if limits.get(role) is not None:
      tokens, tags = tokens[:int(limits[role])], tags[:int(limits[role])]
    names = tag_names(tags, label_list, role, sources.describe(data_cfg, role), class_names)
    seqs: Dict[str, List[np.ndarray]] = {"labels": []}
    starts, kept_tags, dropped = [], [], 0
    for lo in range(0, len(tokens), _TOKENIZE_CHUNK):
      chunk = [[str(w) for w in words] for words in tokens[lo:lo + _TOKENIZE_CHUNK]]
      enc = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length,
                      padding=False, return_attention_mask=False)
      for field in ("input_ids", "token_type_ids"):
        if field in enc:
          seqs.setdefault(field, []).extend(np.asarray(a, np.int32) for a in enc[field])
      for j in range(len(chunk)):
        word_ids = enc.word_ids(j)
        row = [index[t] for t in names[lo + j]]
        seqs["labels"].append(align_labels(word_ids, row, label_all, b_to_i))
        pos, words = first_subtokens(word_ids)
        starts.append(pos)
        kept_tags.append([names[lo + j][w] for w in words])
        dropped += len(row) - len(words)
    examples[role] = Examples(seqs=seqs, values={})
    if dropped:
      log.warning("%s data: %d word(s) cut by max_length=%d or tokenized to nothing are neither "
                  "trained on nor scored.", role, dropped, max_length)
    if role == "validation":
      word_tags = WordTags(starts, kept_tags, dropped)
  pad_id = tokenizer.pad_token_id
  return TaskData(train=examples.get("train"), eval=examples.get("validation"),
                  label_list=label_list, num_labels=len(label_list), problem_type=PROBLEM_TYPE,
                  eval_raw=word_tags,
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id),
                              "labels": IGNORE_INDEX})

