"""The one module that talks to `datasets` and TFDS: raw splits from local files, the hub or TFDS.

Everything downstream sees plain `datasets.Dataset` objects keyed by role ("train", "validation"),
or for a streamed split (`stream_texts`) a `TextShare`: one process's share of the texts, read
lazily through a `datasets.IterableDataset`, so a `datasets` or TFDS version bump touches only
this file.

GLUE TSV files are read as the GLUE download script writes them: CoLA train/dev have no header,
MRPC starts with a UTF-8 BOM and has stray quotes (so quoting is disabled), and the label and
text columns are renamed to the hub's `glue` names (`label`, `sentence1`, `sentence2`) so one
config serves both the hub and the files.
"""

import csv
import itertools
import os
import pathlib
from typing import Any, Dict, Iterator, List, Mapping, Optional

import datasets
from datasets.distributed import split_dataset_by_node

from flaxhf.errors import UserError

ROLES = ("train", "validation")

TEXT_UNITS = ("line", "paragraph", "file")

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json"}

# CoLA train/dev as published: four columns and no header.
COLA_COLUMNS = ["source", "label", "original_label", "sentence"]

# Published GLUE TSV headers -> the hub's `glue` column names (applied only if the target is free).
GLUE_RENAMES = {
    "Quality": "label",  # MRPC
    "#1 String": "sentence1",  # MRPC
    "#2 String": "sentence2",  # MRPC
    "score": "label",  # STS-B
    "is_duplicate": "label",  # QQP
    "gold_label": "label",  # MNLI
}


class DataError(UserError, ValueError):
  """A data set that cannot be used as configured (missing file, column, label or split)."""


def get_option(cfg: Any, name: str, default: Any = None) -> Any:
  """`cfg.name` for a ConfigDict, dataclass or dict; `default` when absent or None."""
  value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
  return default if value is None else value


def describe(cfg: Any, role: str) -> str:
  """Where a role's data comes from, for error messages."""
  path = get_option(cfg, f"{role}_file")
  if path:
    return str(path)
  split = get_option(cfg, f"{role}_split", role)
  if get_option(cfg, "tfds_name"):
    return f"tfds:{get_option(cfg, 'tfds_name')}[{split}]"
  subset = get_option(cfg, "subset")
  return f"{get_option(cfg, 'dataset')}{'/' + subset if subset else ''}[{split}]"


def load_splits(cfg: Any) -> Dict[str, datasets.Dataset]:
  """Raw splits keyed by role ("train", "validation"); only the configured roles are present.

  Source order: local files (`train_file`, `validation_file`), else TFDS (`tfds_name`), else the
  hub (`dataset`, `subset`). A split name of "" skips that role for TFDS and the hub.
  """
  files = {role: get_option(cfg, f"{role}_file") for role in ROLES}
  if any(files.values()):
    splits = {role: read_file(path) for role, path in files.items() if path}
  elif get_option(cfg, "tfds_name"):
    splits = _load_tfds(cfg)
  elif get_option(cfg, "dataset"):
    splits = _load_hub(cfg)
  else:
    raise DataError("No data source: set data.train_file/data.validation_file (local csv, tsv, "
                    "json, jsonl), data.dataset (hub name) or data.tfds_name.")
  for role, ds in splits.items():
    if ds.num_rows == 0:
      raise DataError(f"The {role} data {describe(cfg, role)} has no rows.")
  return splits


def column_values(ds: datasets.Dataset, name: str) -> list:
  """One column as a Python list (fast: iterating a `Column` object costs ~10 us per row)."""
  return ds.select_columns([name])[:][name]


def is_class_label(feature) -> bool:
  """Whether a column's feature is categorical with names (hub/TFDS ClassLabel)."""
  return isinstance(feature, datasets.ClassLabel)


def is_sequence(feature) -> bool:
  """Whether a column's feature holds a list per row (multi-label)."""
  return isinstance(feature, (datasets.Sequence, getattr(datasets, "List", list), list))


def read_file(path: str) -> datasets.Dataset:
  """One local csv/tsv/json/jsonl file as a Dataset, the format taken from the extension."""
  path = pathlib.Path(path)
  fmt = FORMATS.get(path.suffix.lower())
  if fmt is None:
    raise DataError(f"Cannot infer the format of {path}: use one of the extensions "
                    f"{sorted(FORMATS)}.")
  if not path.is_file():
    raise DataError(f"Data file not found: {path}")
  with open(path, encoding="utf-8-sig") as f:
    lines = list(itertools.islice((line for line in f if line.strip()), 2))
  if not lines:
    raise DataError(f"Data file {path} is empty.")
  first_line = lines[0]
  headerless = fmt == "tsv" and _is_headerless_cola(first_line)
  if fmt in ("csv", "tsv") and not headerless and len(lines) < 2:
    raise DataError(f"Data file {path} has a header but no rows.")
  # keep_default_na=False: sentences like "NA" or "null" must stay text, not become missing.
  if fmt == "tsv":
    kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig",
                  keep_default_na=False)
    if headerless:
      kwargs.update(header=None, column_names=COLA_COLUMNS)
    ds = _load_local("csv", path, **kwargs)
    ds = _glue_rename(ds)
  elif fmt == "csv":
    ds = _load_local("csv", path, encoding="utf-8-sig", keep_default_na=False)
  else:
    ds = _load_local("json", path)
  if ds.num_rows == 0:
    raise DataError(f"Data file {path} has no rows.")
  return ds


def _load_local(builder: str, path: pathlib.Path, **kwargs) -> datasets.Dataset:
  try:
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
  except Exception as e:  # datasets wraps parser errors in several types; name the file.
    raise DataError(f"Could not read {path} as {builder}: {e}") from e


def _is_headerless_cola(first_line: str) -> bool:
  fields = first_line.rstrip("\r\n").split("\t")
  return len(fields) == len(COLA_COLUMNS) and fields[1] in ("0", "1")


def _glue_rename(ds: datasets.Dataset) -> datasets.Dataset:
  renames = {}
  for old, new in GLUE_RENAMES.items():
    if old in ds.column_names and new not in ds.column_names and new not in renames.values():
      renames[old] = new
  return ds.rename_columns(renames) if renames else ds


def _hub_offline() -> bool:
  env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  return env or bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _wanted_splits(cfg: Any) -> Dict[str, str]:
  wanted = {role: get_option(cfg, f"{role}_split", role) for role in ROLES}
  return {role: split for role, split in wanted.items() if split}


def _load_hub(cfg: Any) -> Dict[str, datasets.Dataset]:
  name, subset = get_option(cfg, "dataset"), get_option(cfg, "subset")
  try:
    dsd = datasets.load_dataset(name, subset)
  except OSError as e:  # ConnectionError, LocalEntryNotFound and DatasetNotFound are all OSErrors.
    why = "HF_HUB_OFFLINE=1 is set" if _hub_offline() else "the hub could not be reached"
    raise DataError(
        f"Could not load dataset {name!r}{f' (subset {subset!r})' if subset else ''} from the "
        f"Hugging Face hub: {why} ({type(e).__name__}: {e}). Download the data elsewhere and pass "
        "local files instead: --config.data.train_file=PATH --config.data.validation_file=PATH "
        "(csv, tsv, json or jsonl).") from e
  if isinstance(dsd, datasets.Dataset):
    dsd = datasets.DatasetDict(train=dsd)
  splits = {}
  for role, split in _wanted_splits(cfg).items():
    if split not in dsd:
      raise DataError(f"Dataset {name!r} has no split {split!r} for {role}; it has "
                      f"{sorted(dsd)} (set data.{role}_split).")
    splits[role] = dsd[split]
  return splits


def _load_tfds(cfg: Any) -> Dict[str, datasets.Dataset]:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError("data.tfds_name needs TFDS: pip install 'flaxhf[tfds]' "
                    "(tensorflow-datasets + array-record; TensorFlow itself is not needed).") from e
  name, data_dir = get_option(cfg, "tfds_name"), get_option(cfg, "tfds_data_dir")
  splits = {}
  for role, split in _wanted_splits(cfg).items():
    try:
      # data_source reads ArrayRecord files by random access, with no TensorFlow import.
      source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # TFDS raises assorted types for missing names, splits and files.
      raise DataError(f"Could not open TFDS {name!r} split {split!r} (data_dir={data_dir}): {e}. "
                      "It must be prepared with file_format='array_record'.") from e
    splits[role] = _tfds_to_dataset(source)
  return splits


def _tfds_to_dataset(source, chunk: int = 4096) -> datasets.Dataset:
  """Materialises a TFDS data source as a Dataset: bytes -> str, ClassLabel names kept."""
  tfds_features = source.dataset_info.features
  columns: Dict[str, List[Any]] = {name: [] for name in tfds_features.keys()}
  n = len(source)
  for start in range(0, n, chunk):
    for record in source.__getitems__(list(range(start, min(start + chunk, n)))):
      for name, value in record.items():
        columns[name].append(_decode(value))
  ds = datasets.Dataset.from_dict(columns)
  for name, feature in tfds_features.items():
    names = getattr(feature, "names", None)  # tfds ClassLabel
    if names is not None and n:
      ds = ds.cast_column(name, datasets.ClassLabel(names=list(names)))
  return ds


def _decode(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):  # numpy scalars and arrays -> Python values for arrow
    value = value.tolist()
    if isinstance(value, list):
      return [_decode(v) for v in value]
    return _decode(value)
  return value


# ---- plain text and streamed splits --------------------------------------------------------------

def iter_text_file(path: str, unit: str = "line") -> Iterator[str]:
  """The non-blank texts of a plain text file, read lazily: lines, blank-line separated
  paragraphs (inner line breaks kept), or the whole file as one text."""
  if unit not in TEXT_UNITS:
    raise ValueError(f"data.text_unit={unit!r} is not one of {TEXT_UNITS}.")
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"Data file not found: {path}")
  with open(path, encoding="utf-8-sig", newline=None) as f:  # \r\n read as \n
    if unit == "file":
      content = f.read()
      if content.strip():
        yield content.strip("\n")
      return
    current = []
    for line in f:
      line = line[:-1] if line.endswith("\n") else line
      if unit == "line":
        if line.strip():
          yield line
      elif line.strip():
        current.append(line)
      elif current:
        yield "\n".join(current)
        current = []
    if current:
      yield "\n".join(current)


class TextShare:
  """One process's share of a split's non-blank texts, read lazily from a resumable position.

  `iterate(state)` starts over at `state` (None: the start); `state_dict()` is the position after
  the last text it yielded (JSON-able: datasets' IterableDataset state).
  """

  def __init__(self, open_dataset, column: str, where: str):
    self._open, self.column, self.where = open_dataset, column, where
    self._ds: Optional[datasets.IterableDataset] = None

  def iterate(self, state: Optional[dict] = None) -> Iterator[str]:
    self._ds = self._open()
    if state is not None:
      self._ds.load_state_dict(state)
    return self._texts(self._ds)

  def _texts(self, ds) -> Iterator[str]:
    for row in ds:
      if self.column not in row:
        raise DataError(f"{self.where} has no text column {self.column!r}; columns: "
                        f"{sorted(row)} (set data.text_column).")
      text = row[self.column]
      if text and str(text).strip():
        yield str(text)

  def state_dict(self) -> dict:
    if self._ds is None:
      raise RuntimeError("TextShare.state_dict() before iterate().")
    return self._ds.state_dict()


def stream_texts(cfg: Any, role: str = "train", *, column: str = "text", unit: str = "line",
                 process_index: int = 0, process_count: int = 1) -> TextShare:
  """The texts of `role` as a lazily read stream: process `process_index` of `process_count` gets
  a disjoint share (whole files or hub shards when they divide evenly, else every
  `process_count`-th row: datasets' split_dataset_by_node), all of it when alone.

  Local csv/tsv/json/jsonl files are read by column, other files as plain text per `unit`
  (`iter_text_file`); else the hub (`dataset`, `subset`, `{role}_split`) in streaming mode.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  path = get_option(cfg, f"{role}_file")
  where = describe(cfg, role)
  if path:
    path = pathlib.Path(path)
    if not path.is_file():
      raise DataError(f"Data file not found: {path}")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
      def open_all():
        return datasets.IterableDataset.from_generator(
            _text_rows, gen_kwargs={"paths": [str(path)], "unit": unit})
    else:
      kwargs = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
      builder = "csv" if fmt in ("csv", "tsv") else "json"
      if builder == "csv":
        kwargs.update(encoding="utf-8-sig", keep_default_na=False)

      def open_all():
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                     **kwargs)
  elif get_option(cfg, "tfds_name"):
    raise DataError("data.streaming reads local files or the hub, not TFDS: set "
                    "data.train_file, or data.streaming=False.")
  elif get_option(cfg, "dataset"):
    name, subset = get_option(cfg, "dataset"), get_option(cfg, "subset")
    split = get_option(cfg, f"{role}_split", role)

    def open_all():
      try:
        return datasets.load_dataset(name, subset, split=split, streaming=True)
      except OSError as e:  # as _load_hub: every "not reachable / not found" is an OSError
        why = "HF_HUB_OFFLINE=1 is set" if _hub_offline() else "the hub could not be reached"
        sub = f" (subset {subset!r})" if subset else ""
        raise DataError(f"Could not stream dataset {name!r}{sub} split {split!r} from the Hugging "
                        f"Face hub: {why} ({type(e).__name__}: {e}). Pass local files instead: "
                        "--config.data.train_file=PATH.") from e
  else:
    raise DataError("No data source: set data.train_file (a local text, csv, tsv, json or jsonl "
                    "file) or data.dataset (hub name).")

  def open_share():
    ds = open_all()
    return ds if process_count == 1 else split_dataset_by_node(ds, rank=process_index,
                                                                 world_size=process_count)
  return TextShare(open_share, column="text" if path and fmt is None else column, where=where)


def _text_rows(paths: List[str], unit: str):
  for path in paths:
    for text in iter_text_file(path, unit):
      yield {"text": text}
