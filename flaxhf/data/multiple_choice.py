"""Multiple choice data (SWAG layout): each example becomes C (context, question + ending) pairs.

Columns default to SWAG's: context `sent1`, question `sent2` (may be empty, as in CODAH), endings
`ending0`..`endingN` (the count taken from the data) and `label`. Every example's sequence fields
are [C, L] arrays, the choices padded to the example's longest, with an explicit attention mask so
that padding inside an example is never attended to.
"""

import re
from typing import Any, Dict, List

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData

PROBLEM_TYPE = "multiple_choice"

_TOKENIZE_CHUNK = 2048


def ending_columns(cfg: Any, columns: List[str], where: str) -> List[str]:
  """data.ending_columns, else every `<ending_prefix><i>` column for i = 0, 1, ... (no gaps)."""
  given = get_option(cfg, "ending_columns")
  if isinstance(given, str):
    given = [c.strip() for c in given.split(",") if c.strip()]
  if given:
    missing = [c for c in given if c not in columns]
    if missing:
      raise DataError(f"The data {where} has no ending column(s) {missing} (columns: {columns}).")
    return list(given)
  prefix = get_option(cfg, "ending_prefix", "ending")
  found = sorted(int(m.group(1)) for c in columns
                 if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", c)))
  if not found:
    raise DataError(f"The data {where} has no `{prefix}0`, `{prefix}1`, ... columns (columns: "
                    f"{columns}); set data.ending_prefix or data.ending_columns.")
  if found != list(range(len(found))):
    raise DataError(f"The ending columns of {where} are numbered {found}, not 0..{len(found) - 1}; "
                    "set data.ending_columns to pick them explicitly.")
  return [f"{prefix}{i}" for i in found]


def prepare_multiple_choice(data_cfg: Any, tokenizer) -> TaskData:
  """Loads the configured splits and tokenizes every example as [choices, length] pairs."""
  raw = sources.load_splits(data_cfg)
  context_col = get_option(data_cfg, "context_column", "sent1")
  question_col = get_option(data_cfg, "question_column", "sent2")
  label_col = get_option(data_cfg, "label_column", "label")
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  max_length = int(get_option(data_cfg, "max_length", min(tokenizer.model_max_length, 512)))
  examples, num_choices = {}, None
  for role, ds in raw.items():
    where = sources.describe(data_cfg, role)
    endings = ending_columns(data_cfg, ds.column_names, where)
    if num_choices not in (None, len(endings)):
      raise DataError(f"The {role} data {where} has {len(endings)} choices, the train data "
                      f"{num_choices}; every split needs the same number.")
    num_choices = len(endings)
    missing = [c for c in (context_col, label_col) if c not in ds.column_names]
    if missing:
      raise DataError(f"The {role} data {where} has no column(s) {missing} (columns: "
                      f"{ds.column_names}); set data.context_column / data.label_column.")
    if limits.get(role) is not None and int(limits[role]) < ds.num_rows:
      ds = ds.select(range(int(limits[role])))
    contexts = sources.column_values(ds, context_col)
    questions = (sources.column_values(ds, question_col) if question_col and
                 question_col in ds.column_names else [""] * ds.num_rows)
    choices = [sources.column_values(ds, c) for c in endings]
    for col, values in zip(endings, choices):
      bad = [i for i, v in enumerate(values) if v is None or not str(v).strip()]
      if bad:
        raise DataError(f"The {role} data {where} has a missing or empty ending in column {col!r} "
                        f"at row(s) {bad[:10]} ({len(bad)} in all); every example needs all "
                        f"{num_choices} endings.")
    labels = _labels(sources.column_values(ds, label_col), num_choices, role, where, label_col)
    firsts = [c or "" for c in contexts for _ in endings]
    seconds = [" ".join(filter(None, [(q or "").strip(), str(e).strip()]))
               for q, *es in zip(questions, *choices) for e in es]
    examples[role] = Examples(seqs=_tokenize_choices(tokenizer, firsts, seconds, num_choices,
                                                     max_length),
                              values={"labels": labels})
  pad_id = tokenizer.pad_token_id
  return TaskData(train=examples.get("train"), eval=examples.get("validation"), label_list=None,
                  num_labels=num_choices, problem_type=PROBLEM_TYPE,
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id)})


def _labels(values: list, num_choices: int, role: str, where: str, column: str) -> np.ndarray:
  """Label ids [N] in [0, num_choices); anything else (-1 for unlabelled SWAG test) is an error."""
  out = []
  for i, v in enumerate(values):
    try:
      label = int(v)
    except (TypeError, ValueError):
      label = -1
    if not 0 <= label < num_choices or (isinstance(v, float) and v != label):
      raise DataError(f"The {role} data {where}, row {i}: label {v!r} in column {column!r} is not "
                      f"a choice index in 0..{num_choices - 1} (unlabelled data cannot be used "
                      "for training or evaluation).")
    out.append(label)
  return np.asarray(out, np.int32)


def _tokenize_choices(tokenizer, firsts: List[str], seconds: List[str], num_choices: int,
                      max_length: int) -> Dict[str, List[np.ndarray]]:
  """Pairs tokenized in bulk, then grouped per example as [C, L] arrays plus an attention mask."""
  flat: Dict[str, List[List[int]]] = {}
  for lo in range(0, len(firsts), _TOKENIZE_CHUNK):
    enc = tokenizer(firsts[lo:lo + _TOKENIZE_CHUNK], seconds[lo:lo + _TOKENIZE_CHUNK],
                    truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False)
    for field in ("input_ids", "token_type_ids"):
      if field in enc:
        flat.setdefault(field, []).extend(enc[field])
  pad_id = 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
  seqs: Dict[str, List[np.ndarray]] = {f: [] for f in (*flat, "attention_mask")}
  for lo in range(0, len(firsts), num_choices):
    rows = flat["input_ids"][lo:lo + num_choices]
    width = max(len(r) for r in rows)
    mask = np.zeros((num_choices, width), np.int32)
    for c, r in enumerate(rows):
      mask[c, :len(r)] = 1
    seqs["attention_mask"].append(mask)
    for field, values in flat.items():
      arr = np.full((num_choices, width), pad_id if field == "input_ids" else 0, np.int32)
      for c, r in enumerate(values[lo:lo + num_choices]):
        arr[c, :len(r)] = r
      seqs[field].append(arr)
  return seqs
