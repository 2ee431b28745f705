"""Extractive QA data: SQuAD files or hub splits -> windowed features with start/end token labels.

Two layouts are read: SQuAD JSON as published (`{"data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`) and the
flattened rows of the hub's `squad` (`id, title, context, question, answers: {"text": [...],
"answer_start": [...]}`) as a JSON list, a `{"data": [rows]}` object (HF's test samples), JSON lines
or a hub/TFDS data set. Windows and labels follow HF's examples/pytorch/question-answering/run_qa.py.

A training answer whose `text` is not found at `answer_start` in its context would teach a wrong span,
so it is an error naming the questions; `data.skip_mismatched_answers=True` drops those questions
instead (the count is logged and kept in `QATaskData.skipped_train`).
"""

import dataclasses
import json
import logging
import pathlib
from typing import Any, Dict, List, Optional

import numpy as np

from flaxhf import qa
from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData

log = logging.getLogger("flaxhf")

COLUMNS = ("id", "title", "context", "question", "answers")


@dataclasses.dataclass
class QATaskData(TaskData):
  """TaskData plus what span decoding needs: eval examples (`eval_raw`) and their windows."""

  eval_features: Optional[Dict[str, list]] = None  # per eval window: example_id, offset_mapping
  skipped_train: int = 0  # training questions dropped by data.skip_mismatched_answers


def _answers(value, where: str) -> Dict[str, list]:
  """Answers as {"text": [...], "answer_start": [...]} from the hub's dict or SQuAD's list of dicts."""
  if value is None:
    return {"text": [], "answer_start": []}
  if isinstance(value, dict):
    texts, starts = list(value.get("text") or []), list(value.get("answer_start") or [])
  elif isinstance(value, list):
    texts = [a["text"] for a in value]
    starts = [a["answer_start"] for a in value]
  else:
    raise DataError(f"{where}: answers must be a list of {{text, answer_start}} or a dict of lists; "
                    f"got {type(value).__name__}.")
  if len(texts) != len(starts):
    raise DataError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values.")
  return {"text": [str(t) for t in texts], "answer_start": [int(s) for s in starts]}


def _flat_columns(rows: List[dict], cols: Dict[str, str], where: str) -> Dict[str, list]:
  out = {k: [] for k in COLUMNS}
  for i, row in enumerate(rows):
    for key in ("question", "context"):
      if row.get(cols[key]) is None:
        raise DataError(f"{where}: row {i} has no {cols[key]!r} field (fields: {sorted(row)}); set "
                        f"data.{key}_column.")
    out["id"].append(str(row.get(cols["id"], i)))
    out["title"].append(str(row.get("title", "")))
    out["context"].append(row[cols["context"]])
    out["question"].append(row[cols["question"]])
    answers = row.get(cols["answers"])
    out["answers"].append(_answers(answers, f"{where} row {i}"))
  return out


def _nested_columns(articles: List[dict], where: str) -> Dict[str, list]:
  out = {k: [] for k in COLUMNS}
  for article in articles:
    for paragraph in article.get("paragraphs", []):
      for q in paragraph.get("qas", []):
        out["id"].append(str(q["id"]))
        out["title"].append(str(article.get("title", "")))
        out["context"].append(paragraph["context"])
        out["question"].append(q["question"])
        impossible = q.get("is_impossible", False)  # v2 keeps plausible answers apart
        out["answers"].append(_answers([] if impossible else q.get("answers", []),
                                       f"{where} question {q['id']}"))
  return out


def read_squad_file(path: str, cols: Optional[Dict[str, str]] = None) -> Dict[str, list]:
  """One local SQuAD .json (nested or flat rows) or .jsonl (flat rows) file as columns COLUMNS."""
  cols = {**{k: k for k in COLUMNS}, **(cols or {})}
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"Data file not found: {path}")
  if path.suffix.lower() not in (".json", ".jsonl"):
    raise DataError(f"Question answering reads SQuAD .json or .jsonl files; got {path}.")
  try:
    with open(path, encoding="utf-8-sig") as f:
      if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in f if line.strip()]
      else:
        rows = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"Could not read {path} as JSON: {e}") from e
  if isinstance(rows, dict):
    if "data" not in rows:
      raise DataError(f"{path} is a JSON object without a 'data' list: not SQuAD.")
    rows = rows["data"]
  if not rows:
    raise DataError(f"Data file {path} has no questions.")
  if isinstance(rows[0], dict) and "paragraphs" in rows[0]:
    out = _nested_columns(rows, str(path))
  else:
    out = _flat_columns(rows, cols, str(path))
  if not out["id"]:
    raise DataError(f"Data file {path} has no questions.")
  return out


def _dataset_columns(ds, cols: Dict[str, str], where: str) -> Dict[str, list]:
  missing = [cols[k] for k in ("question", "context", "answers") if cols[k] not in ds.column_names]
  if missing:
    raise DataError(f"{where} has no column(s) {missing}; columns: {ds.column_names} (set "
                    "data.question_column / context_column / answer_column).")
  return _flat_columns(ds.to_list(), cols, where)


def load_qa_splits(cfg: Any) -> Dict[str, Dict[str, list]]:
  """Raw questions per role ("train", "validation") as columns, from local files or the hub."""
  cols = {k: get_option(cfg, f"{k}_column", k) for k in ("id", "question", "context")}
  cols["answers"] = get_option(cfg, "answer_column", "answers")
  files = {role: get_option(cfg, f"{role}_file") for role in sources.ROLES}
  if any(files.values()):
    raw = {role: read_squad_file(path, cols) for role, path in files.items() if path}
  else:
    raw = {role: _dataset_columns(ds, cols, sources.describe(cfg, role))
           for role, ds in sources.load_splits(cfg).items()}
  for role, columns in raw.items():
    ids = columns["id"]
    if len(set(ids)) != len(ids):
      dup = next(i for i in ids if ids.count(i) > 1)
      raise DataError(f"The {role} data {sources.describe(cfg, role)} repeats question id {dup!r}: "
                      "ids must be unique (predictions are keyed by them).")
  return raw


def select(columns: Dict[str, list], rows) -> Dict[str, list]:
  return {k: [v[i] for i in rows] for k, v in columns.items()}


def mismatched_answers(columns: Dict[str, list]) -> List[int]:
  """Rows whose first answer's text is not at its answer_start in the context (the training label)."""
  bad = []
  for i, (context, answers) in enumerate(zip(columns["context"], columns["answers"])):
    if answers["text"]:
      start, text = answers["answer_start"][0], answers["text"][0]
      if start < 0 or context[start:start + len(text)] != text:
        bad.append(i)
  return bad


def span_labels(offsets: List[Optional[tuple]], cls_index: int, start_char: Optional[int],
                end_char: Optional[int]):
  """(start, end) token labels of one window (offsets None off the context), as run_qa.py."""
  context = [t for t, o in enumerate(offsets) if o is not None]
  if start_char is None or not context:
    return cls_index, cls_index
  first, last = context[0], context[-1]
  if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
    return cls_index, cls_index
  # run_qa.py's walk runs past the context onto [SEP]/padding (offsets (0, 0)) when the answer
  # starts in the window's last context token, labelling [SEP]; stopping at `last` labels the token.
  start = first
  while start <= last and offsets[start][0] <= start_char:
    start += 1
  end = last
  while end >= first and offsets[end][1] >= end_char:
    end -= 1
  return start - 1, end + 1


def featurize(tokenizer, columns: Dict[str, list], max_length: int, doc_stride: int,
              train: bool) -> Dict[str, list]:
  """Windows of every question (run_qa.py's train or validation features); int32 token arrays."""
  feats = qa.prepare_qa_features(tokenizer, columns["question"], columns["context"], max_length,
                                 doc_stride, example_ids=range(len(columns["id"])))
  out = {k: [np.asarray(v, np.int32) for v in feats[k]]
         for k in ("input_ids", "token_type_ids") if k in feats}
  rows = feats["example_id"]
  if train:
    cls_ids = [i for i in (tokenizer.cls_token_id, tokenizer.bos_token_id) if i is not None]
    starts, ends = [], []
    for ids, offsets, row in zip(feats["input_ids"], feats["offset_mapping"], rows):
      cls_index = next((ids.index(c) for c in cls_ids if c in ids), 0)
      answers = columns["answers"][row]
      s = answers["answer_start"][0] if answers["text"] else None
      e = s + len(answers["text"][0]) if answers["text"] else None
      a, b = span_labels(offsets, cls_index, s, e)
      starts.append(a)
      ends.append(b)
    out["start_positions"] = np.asarray(starts, np.int32)
    out["end_positions"] = np.asarray(ends, np.int32)
  else:
    out["example_id"] = [columns["id"][r] for r in rows]
    out["offset_mapping"] = feats["offset_mapping"]
  return out


def prepare_question_answering(data_cfg: Any, tokenizer) -> QATaskData:
  """Loads, checks and windows the configured splits into training and evaluation features."""
  raw = load_qa_splits(data_cfg)
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  for role, limit in limits.items():  # counted in questions, before windowing
    if role in raw and limit is not None and int(limit) < len(raw[role]["id"]):
      raw[role] = select(raw[role], range(int(limit)))
  v2 = bool(get_option(data_cfg, "version_2_with_negative", False))
  if "validation" in raw and not v2:
    unanswerable = [q for q, a in zip(raw["validation"]["id"], raw["validation"]["answers"])
                    if not a["text"]]
    if unanswerable:
      raise DataError(f"{len(unanswerable)} validation questions have no answer (e.g. "
                      f"{unanswerable[0]!r}): SQuAD v2 data needs data.version_2_with_negative=True.")
  skipped = 0
  if "train" in raw:
    bad = mismatched_answers(raw["train"])
    if bad and not get_option(data_cfg, "skip_mismatched_answers", False):
      t = raw["train"]
      i = bad[0]
      s, text = t["answers"][i]["answer_start"][0], t["answers"][i]["text"][0]
      raise DataError(
          f"{len(bad)} of {len(t['id'])} training questions in {sources.describe(data_cfg, 'train')}"
          f" have an answer text that is not at its answer_start in the context (e.g. {t['id'][i]!r}:"
          f" answer {text!r} but context[{s}:{s + len(text)}] is "
          f"{t['context'][i][s:s + len(text)]!r}). Fix the offsets, or set "
          "data.skip_mismatched_answers=True to drop these questions.")
    if bad:
      skipped = len(bad)
      log.warning("Skipping %d of %d training questions whose answer text is not at answer_start.",
                  skipped, len(raw["train"]["id"]))
      keep = sorted(set(range(len(raw["train"]["id"]))) - set(bad))
      raw["train"] = select(raw["train"], keep)
  max_length = int(get_option(data_cfg, "max_length", 384))
  stride = int(get_option(data_cfg, "doc_stride", 128))
  examples, eval_features = {}, None
  for role, columns in raw.items():
    feats = featurize(tokenizer, columns, max_length, stride, train=role == "train")
    seqs = {k: feats[k] for k in ("input_ids", "token_type_ids") if k in feats}
    if role == "train":
      values = {k: feats[k] for k in ("start_positions", "end_positions")}
    else:
      values = {}
      eval_features = {k: feats[k] for k in ("example_id", "offset_mapping")}
    examples[role] = Examples(seqs=seqs, values=values)
  pad_id = tokenizer.pad_token_id
  return QATaskData(train=examples.get("train"), eval=examples.get("validation"), label_list=None,
                    num_labels=2, problem_type="question_answering",
                    eval_raw=raw.get("validation"), eval_features=eval_features,
                    skipped_train=skipped,
                    pad_values={"input_ids": 0 if pad_id is None else int(pad_id)})
