"""Text (pair) classification and regression data: raw splits -> labels -> tokenized Examples."""

import dataclasses
import pathlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option

SINGLE = "single_label_classification"
REGRESSION = "regression"
MULTI = "multi_label_classification"

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax")

# Tried in order when data.text_columns is unset: hub GLUE names, then common single-text names.
TEXT_COLUMN_CANDIDATES = (("sentence1", "sentence2"), ("premise", "hypothesis"),
                          ("question1", "question2"), ("question", "sentence"), ("sentence",),
                          ("text",))

_TOKENIZE_CHUNK = 2048


@dataclasses.dataclass
class TaskData:
  """Tokenized splits plus what the model head, loss and metrics need to know about the labels."""

  train: Optional[Examples]
  eval: Optional[Examples]
  label_list: Optional[list]
  num_labels: int
  problem_type: str  # "single_label_classification" | "regression" | "multi_label_classification"
  eval_raw: object = None  # anything post-processing needs: here the raw eval Dataset
  task_name: Optional[str] = None  # GLUE task for metric selection, if known
  pad_values: Dict[str, int] = dataclasses.field(default_factory=dict)  # for train/eval_batches


def infer_glue_task(cfg: Any) -> Optional[str]:
  """The GLUE task from data.task_name, a `glue` hub subset, or a .../glue/SST-2/... file path."""
  task = get_option(cfg, "task_name")
  if task:
    return str(task).lower()
  if str(get_option(cfg, "dataset", "")).split("/")[-1] == "glue" and get_option(cfg, "subset"):
    return str(get_option(cfg, "subset")).lower()
  for role in sources.ROLES:
    path = get_option(cfg, f"{role}_file")
    for part in reversed(pathlib.Path(path).parts[:-1] if path else ()):
      key = part.lower().replace("-", "")
      if key in GLUE_TASKS:
        return key
  return None


def prepare_text_classification(data_cfg: Any, tokenizer) -> TaskData:
  """Loads, labels and tokenizes the configured splits (truncated to max_length, unpadded)."""
  raw = sources.load_splits(data_cfg)
  task = infer_glue_task(data_cfg)
  label_column = get_option(data_cfg, "label_column", "label")
  for role, ds in raw.items():
    if label_column not in ds.column_names:
      raise DataError(
          f"The {role} data {sources.describe(data_cfg, role)} has no label column "
          f"{label_column!r} (columns: {ds.column_names}); it looks unlabelled (GLUE test.tsv "
          "files are), so it cannot be used for training or evaluation. Set data.label_column "
          "or point data.train_file/validation_file at a labelled file.")
  text_columns = _text_columns(data_cfg, raw)
  # The label space comes from the FULL splits: a max_train_samples subsample may miss a class.
  labels = {role: sources.column_values(ds, label_column) for role, ds in raw.items()}
  for role, values in labels.items():
    missing = sum(v is None for v in values)
    if missing:
      raise DataError(f"The {role} data {sources.describe(data_cfg, role)} has {missing} row(s) "
                      f"with no value in label column {label_column!r}.")
  feature = next(iter(raw.values())).features[label_column]
  problem_type, label_list = _label_space(feature, labels, data_cfg, task)

  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  for role, limit in limits.items():
    if role in raw and limit is not None and int(limit) < raw[role].num_rows:
      raw[role] = raw[role].select(range(int(limit)))
      labels[role] = labels[role][:int(limit)]
  max_length = int(get_option(data_cfg, "max_length", min(tokenizer.model_max_length, 512)))
  examples = {}
  for role, ds in raw.items():
    label_values = _encode_labels(labels[role], problem_type, label_list, role,
                                  sources.describe(data_cfg, role))
    seqs = tokenize(tokenizer, [sources.column_values(ds, c) for c in text_columns],
                    max_length)
    examples[role] = Examples(seqs=seqs, values={"labels": label_values})
  pad_id = tokenizer.pad_token_id
  return TaskData(train=examples.get("train"), eval=examples.get("validation"),
                  label_list=label_list,
                  num_labels=1 if problem_type == REGRESSION else len(label_list),
                  problem_type=problem_type, eval_raw=raw.get("validation"), task_name=task,
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id)})


def tokenize(tokenizer, texts: Sequence[List[str]], max_length: int) -> Dict[str, List[np.ndarray]]:
  """Batched fast tokenization of one or two text columns; int32 arrays, truncated, no padding."""
  n = len(texts[0])
  seqs: Dict[str, List[np.ndarray]] = {}
  for start in range(0, n, _TOKENIZE_CHUNK):
    chunk = [[t if t is not None else "" for t in col[start:start + _TOKENIZE_CHUNK]]
             for col in texts]
    enc = tokenizer(*chunk, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False)
    for field in ("input_ids", "token_type_ids"):
      if field in enc:
        seqs.setdefault(field, []).extend(np.asarray(ids, dtype=np.int32) for ids in enc[field])
  return seqs


def _text_columns(cfg: Any, raw: Dict[str, Any]) -> List[str]:
  wanted = get_option(cfg, "text_columns")
  if isinstance(wanted, str):
    wanted = [c.strip() for c in wanted.split(",") if c.strip()]
  for role, ds in raw.items():
    if wanted:
      missing = [c for c in wanted if c not in ds.column_names]
      if missing:
        raise DataError(f"The {role} data {sources.describe(cfg, role)} has no column(s) "
                        f"{missing}; available columns: {ds.column_names} (set data.text_columns).")
  if wanted:
    if len(wanted) > 2:
      raise DataError(f"data.text_columns takes one or two columns, got {wanted}.")
    return list(wanted)
  for candidate in TEXT_COLUMN_CANDIDATES:
    if all(c in ds.column_names for ds in raw.values() for c in candidate):
      return list(candidate)
  columns = next(iter(raw.values())).column_names
  raise DataError(f"Could not guess the text columns among {columns}; set data.text_columns, "
                  "e.g. 'sentence' or 'sentence1,sentence2'.")


def _label_space(feature, labels: Dict[str, list], cfg: Any, task: Optional[str]):
  """(problem_type, label_list) from the label feature, the values, data.label_list and the task."""
  given = get_option(cfg, "label_list")
  if isinstance(given, str):
    given = [s.strip() for s in given.split(",")]
  source = labels["train"] if "train" in labels else next(iter(labels.values()))
  if sources.is_class_label(feature):
    return SINGLE, list(given or feature.names)
  if sources.is_sequence(feature) or (source and isinstance(source[0], (list, tuple))):
    return MULTI, list(given) if given else sorted({v for row in source for v in row})
  dtype = getattr(feature, "dtype", "")
  if task == "stsb" or dtype.startswith("float"):
    return REGRESSION, None
  return SINGLE, list(given) if given else sorted(set(source))


def _encode_labels(values: list, problem_type: str, label_list, role: str, where: str):
  """Labels as int32 class ids [N], float32 scores [N] or float32 multi-hot [N, num_labels]."""
  if problem_type == REGRESSION:
    return np.asarray(values, dtype=np.float32)
  index = {v: i for i, v in enumerate(label_list)}
  if problem_type == SINGLE and values and isinstance(values[0], (int, np.integer)) and not any(
      isinstance(v, (int, np.integer)) for v in label_list):
    index = {i: i for i in range(len(label_list))}  # int labels index a list of label names
  rows = values if problem_type == MULTI else [[v] for v in values]
  unknown = sorted({v for row in rows for v in row if v not in index}, key=str)
  if unknown:
    raise DataError(f"The {role} data {where} has label(s) {unknown[:10]} not among the known "
                    f"labels {label_list} (from the train split or data.label_list).")
  if problem_type == SINGLE:
    return np.asarray([index[v] for v in values], dtype=np.int32)
  multi_hot = np.zeros((len(values), len(label_list)), dtype=np.float32)
  for i, row in enumerate(rows):
    multi_hot[i, [index[v] for v in row]] = 1.0
  return multi_hot
