"""Data: GLUE file layouts, labels, clear errors, bucketed batching, resume, process slices."""

import csv
import itertools
import json
import sys

import numpy as np
import pytest

from flaxhf.data import batching, sources
from flaxhf.data.batching import DEFAULT_BUCKETS, Examples, bucket_length
from flaxhf.data.sources import DataError
from flaxhf.data.text_classification import prepare_text_classification, tokenize

GLUE = "text_classification/glue"


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


def _synthetic(n, seed=0, max_len=100, choices=None):
  """Examples whose `labels` value is the example index, so batches reveal which rows they hold."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, max_len + 1, size=n)
  lead = () if choices is None else (choices,)
  ids = [rng.integers(1, 1000, size=lead + (k,)).astype(np.int32) for k in lens]
  tags = [np.full(lead + (k,), 3, np.int32) for k in lens]
  return Examples(seqs={"input_ids": ids, "tags": tags}, values={"labels": np.arange(n)})


PAD = {"input_ids": 0, "tags": -100}


def _take(gen, k):
  return list(itertools.islice(gen, k))


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- sources: real GLUE files


def test_glue_tsv_layouts(data_dir):
  g = data_dir / GLUE
  cola = sources.read_file(g / "CoLA/train.tsv")  # no header
  assert cola.num_rows == 8551
  assert cola.column_names == sources.COLA_COLUMNS
  assert cola[0]["sentence"].startswith("Our friends won't buy this analysis")
  assert set(sources.column_values(cola, "label")) == {0, 1}
  assert sources.read_file(g / "CoLA/dev.tsv").num_rows == 1043

  mrpc = sources.read_file(g / "MRPC/train.tsv")  # UTF-8 BOM, stray quotes
  assert mrpc.num_rows == 3668
  assert {"label", "sentence1", "sentence2", "#1 ID"} <= set(mrpc.column_names)
  assert not any("\ufeff" in c for c in mrpc.column_names)
  assert mrpc[0]["sentence2"].startswith("Referring to him as only \" the witness \"")
  assert sources.read_file(g / "MRPC/dev.tsv").num_rows == 408

  stsb = sources.read_file(g / "STS-B/train.tsv")
  assert stsb.num_rows == 5749
  assert stsb.features["label"].dtype.startswith("float")
  assert sources.column_values(stsb, "label")[:2] == [5.0, 3.8]

  sst2 = sources.read_file(g / "SST-2/train.tsv")
  assert sst2.num_rows == 67349
  assert sources.read_file(g / "SST-2/dev.tsv").num_rows == 872
  assert sources.read_file(g / "RTE/train.tsv").num_rows == 2490
  assert sources.read_file(g / "SST-2/test.tsv").column_names == ["index", "sentence"]


def test_hf_samples_csv_tsv_json_agree(data_dir, tmp_path):
  mrpc = data_dir / "hf_tests_samples/MRPC"
  csv_ds = sources.read_file(mrpc / "dev.csv")
  tsv_ds = sources.read_file(mrpc / "dev.tsv")
  assert csv_ds.num_rows == tsv_ds.num_rows == 6
  # CSV unescapes `"""…"` and the TSV keeps the bare quote: both must give the same text.
  assert csv_ds[0]["sentence2"] == tsv_ds[0]["sentence2"] == (
      '" The foodservice pie business does not fit our long-term growth strategy .')
  assert sources.column_values(csv_ds, "sentence1") == sources.column_values(tsv_ds, "sentence1")
  rows = [csv_ds[i] for i in range(csv_ds.num_rows)]
  jsonl = _write(tmp_path / "dev.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  as_json = _write(tmp_path / "dev.json", json.dumps(rows))
  for path in (jsonl, as_json):
    ds = sources.read_file(path)
    assert [ds[i] for i in range(ds.num_rows)] == rows


def test_glue_prepare_real_labels(data_dir, tokenizer):
  g = data_dir / GLUE
  stsb = prepare_text_classification(
      dict(train_file=str(g / "STS-B/train.tsv"), validation_file=str(g / "STS-B/dev.tsv"),
           max_length=128, max_train_samples=64, max_eval_samples=32), tokenizer)
  assert (stsb.task_name, stsb.problem_type, stsb.num_labels) == ("stsb", "regression", 1)
  assert stsb.train.values["labels"].dtype == np.float32
  np.testing.assert_allclose(stsb.train.values["labels"][:3], [5.0, 3.8, 3.8])
  assert (len(stsb.train), len(stsb.eval)) == (64, 32)
  assert set(stsb.train.seqs) == {"input_ids", "token_type_ids"}  # a BERT pair keeps segments
  assert stsb.train.seqs["token_type_ids"][0].max() == 1

  mrpc = prepare_text_classification(
      dict(train_file=str(data_dir / "hf_tests_samples/MRPC/train.csv"),
           validation_file=str(data_dir / "hf_tests_samples/MRPC/dev.csv"), max_length=128),
      tokenizer)
  assert mrpc.label_list == ["equivalent", "not_equivalent"]  # strings through a sorted list
  assert mrpc.problem_type == "single_label_classification" and mrpc.num_labels == 2
  with open(data_dir / "hf_tests_samples/MRPC/train.csv", encoding="utf-8") as f:
    names = [row["label"] for row in csv.DictReader(f)]
  assert names[:3] == ["equivalent", "not_equivalent", "not_equivalent"]
  assert mrpc.train.values["labels"].tolist() == [mrpc.label_list.index(x) for x in names]
  ids = mrpc.train.seqs["input_ids"][0]
  assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
  assert mrpc.pad_values == {"input_ids": tokenizer.pad_token_id}

  with pytest.raises(DataError, match=r"no label column 'label'.*unlabelled"):
    prepare_text_classification(
        dict(train_file=str(g / "SST-2/dev.tsv"), validation_file=str(g / "SST-2/test.tsv"),
             max_length=32, max_eval_samples=4), tokenizer)


# ---------------------------------------------------------------- labels and errors (tmp files)


def test_string_multilabel_and_label_list(tmp_path, tokenizer):
  train = _write(tmp_path / "train.csv",
                 "text,label\ngood movie,pos\nbad movie,neg\nfine,neutral\n")
  dev = _write(tmp_path / "dev.csv", "text,label\nawful,neg\ngreat,pos\n")
  td = prepare_text_classification(dict(train_file=train, validation_file=dev, max_length=16),
                                   tokenizer)
  assert td.label_list == ["neg", "neutral", "pos"]
  assert td.train.values["labels"].tolist() == [2, 0, 1]
  assert td.eval.values["labels"].tolist() == [0, 2]
  assert td.train.seqs["input_ids"][0].tolist() == tokenizer("good movie")["input_ids"]

  # An explicit label_list fixes the order; int labels then index it.
  td = prepare_text_classification(dict(train_file=train, max_length=16,
                                        label_list="pos,neg,neutral"), tokenizer)
  assert td.train.values["labels"].tolist() == [0, 1, 2] and td.eval is None

  multi = _write(tmp_path / "multi.jsonl", "".join(json.dumps(r) + "\n" for r in [
      {"sentence": "a", "label": ["x", "z"]}, {"sentence": "b", "label": []},
      {"sentence": "c", "label": ["y"]}]))
  td = prepare_text_classification(dict(train_file=multi, max_length=16), tokenizer)
  assert (td.problem_type, td.label_list, td.num_labels) == (
      "multi_label_classification", ["x", "y", "z"], 3)
  np.testing.assert_array_equal(td.train.values["labels"], [[1, 0, 1], [0, 0, 0], [0, 1, 0]])


def test_clear_errors(tmp_path, tokenizer):
  train = _write(tmp_path / "train.tsv", "sentence\tlabel\nok\tpos\nno\tneg\n")
  dev = _write(tmp_path / "dev.tsv", "sentence\tlabel\nhm\tmaybe\n")
  with pytest.raises(DataError, match=r"label\(s\) \['maybe'\] not among the known labels "
                                      r"\['neg', 'pos'\]"):
    prepare_text_classification(dict(train_file=train, validation_file=dev, max_length=8),
                                tokenizer)
  with pytest.raises(DataError, match=r"no column\(s\) \['sentence1'\]; available columns: "
                                      r"\['sentence', 'label'\]"):
    prepare_text_classification(dict(train_file=train, text_columns="sentence1,sentence",
                                     max_length=8), tokenizer)
  unlabelled = _write(tmp_path / "some.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n')
  with pytest.raises(DataError, match=r"some\.jsonl has 1 row\(s\) with no value in label column"):
    prepare_text_classification(dict(train_file=unlabelled, max_length=8), tokenizer)
  empty = _write(tmp_path / "empty.csv", "")
  with pytest.raises(DataError, match=r"empty\.csv is empty"):
    sources.load_splits(dict(train_file=empty))
  header_only = _write(tmp_path / "header.jsonl", "\n")
  with pytest.raises(DataError, match=r"header\.jsonl is empty"):
    sources.read_file(header_only)
  header_only = _write(tmp_path / "header.csv", "sentence,label\n")
  with pytest.raises(DataError, match=r"header\.csv has a header but no rows"):
    sources.read_file(header_only)
  with pytest.raises(DataError, match=r"Cannot infer the format of .*data\.parquet"):
    sources.read_file(tmp_path / "data.parquet")
  with pytest.raises(DataError, match=r"No data source"):
    sources.load_splits({})


def test_offline_hub_error(monkeypatch):
  hub_constants = pytest.importorskip("huggingface_hub.constants")
  import datasets  # pylint: disable=import-outside-toplevel
  # Force offline mode even if the caller's environment did not: no network is ever tried.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  with pytest.raises(DataError, match=r"HF_HUB_OFFLINE=1.*data\.train_file=PATH"):
    sources.load_splits(dict(dataset="flaxhf-never-cached/glue", subset="sst2"))


def test_tfds_array_record_without_tensorflow(tmp_path, tokenizer):
  tfds = pytest.importorskip("tensorflow_datasets", reason="pip install 'flaxhf[tfds]'")

  class FlaxhfTinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "sentence": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"sentence": f"sentence number {i}", "label": i % 2}

  FlaxhfTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  cfg = dict(tfds_name="flaxhf_tiny_text", tfds_data_dir=str(tmp_path), max_length=16)
  splits = sources.load_splits(cfg)
  assert {k: v.num_rows for k, v in splits.items()} == {"train": 6, "validation": 3}
  rows = sorted((r["sentence"], r["label"]) for r in splits["train"])  # TFDS shuffles on write
  assert rows == [(f"sentence number {i}", i % 2) for i in range(6)]
  td = prepare_text_classification(cfg, tokenizer)
  assert td.label_list == ["neg", "pos"] and len(td.eval) == 3
  assert "tensorflow" not in sys.modules  # array_record data sources need no TensorFlow


# ---------------------------------------------------------------- batching


def test_bucket_length():
  b = DEFAULT_BUCKETS
  assert [bucket_length(n, b, 512) for n in (0, 1, 16, 17, 97, 129, 512)] == [
      16, 16, 16, 24, 128, 192, 512]
  assert bucket_length(97, b, 100) == 100  # capped, never above max_length
  assert bucket_length(600, b, 1024) == 1024  # past the largest bucket: max_length
  assert bucket_length(5, None, 128) == 128  # no buckets: fixed length
  with pytest.raises(ValueError, match="exceeds max_length=128"):
    bucket_length(129, b, 128)
  assert batching.steps_per_epoch(100, 8) == 12 and batching.eval_steps(100, 8) == 13


def test_check_buckets_and_config_default():
  from configs.common import base_config
  assert base_config("x").data.buckets == DEFAULT_BUCKETS  # the config states the default
  assert batching.check_buckets((128, 64, np.int64(64))) == (64, 128)
  assert batching.check_buckets(()) == batching.check_buckets(None) == ()
  for bad in ((0,), (64, "128"), (1.5,), (True,)):
    with pytest.raises(ValueError, match="data.buckets must be positive ints"):
      batching.check_buckets(bad)


def test_train_batches_bucketing_padding_and_masks():
  ex = _synthetic(200, max_len=100)
  lengths = ex.lengths()
  for batch in _take(batching.train_batches(ex, global_batch_size=16, seed=3, max_length=100,
                                            pad_values=PAD), 30):
    rows = batch["labels"]
    longest = lengths[rows].max()
    want = min([x for x in DEFAULT_BUCKETS if x >= longest] + [100])
    assert batch["input_ids"].shape == batch["tags"].shape == (16, want) and want <= 100
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), lengths[rows])
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == 0).all() and (batch["tags"][pad] == -100).all()
    assert (batch["input_ids"][~pad] > 0).all()
    assert batch["input_ids"].dtype == np.int32


def test_multiple_choice_shapes():
  ex = _synthetic(10, max_len=20, choices=4)
  batch = next(batching.train_batches(ex, global_batch_size=4, seed=0, max_length=32,
                                      pad_values=PAD))
  want = bucket_length(ex.lengths()[batch["labels"]].max(), DEFAULT_BUCKETS, 32)
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 4, want)
  np.testing.assert_array_equal(batch["attention_mask"].sum(-1)[:, 0],
                                ex.lengths()[batch["labels"]])


def test_per_field_max_length_and_select():
  rng = np.random.default_rng(0)
  ex = Examples(seqs={"input_ids": [rng.integers(1, 9, size=k) for k in (5, 30, 12, 7)],
                      "decoder_input_ids": [rng.integers(1, 9, size=k) for k in (3, 4, 60, 2)]},
                values={"labels": np.arange(4)})
  assert ex.select([2, 0]).lengths().tolist() == [12, 5] and len(ex.select([3])) == 1
  (batch,) = batching.eval_batches(ex, global_batch_size=4, pad_values=PAD,
                                   max_length={"input_ids": 40, "decoder_input_ids": 64})
  # Each sequence field gets its own bucket; the attention mask follows input_ids.
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 32)
  assert batch["decoder_input_ids"].shape == (4, 64)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_train_determinism_and_exact_resume(group_by_length):
  ex = _synthetic(100)
  kw = dict(global_batch_size=8, seed=7, max_length=128, pad_values=PAD,
            group_by_length=group_by_length)
  full = _take(batching.train_batches(ex, **kw), 40)  # 12 steps per epoch: crosses 3 epochs
  _assert_batches_equal(full, _take(batching.train_batches(ex, **kw), 40))
  for start in (1, 11, 12, 13, 25, 39):
    _assert_batches_equal(full[start:], _take(batching.train_batches(ex, start_step=start, **kw),
                                              40 - start))
  for epoch in range(3):
    seen = np.concatenate([b["labels"] for b in full[12 * epoch:12 * (epoch + 1)]])
    assert len(seen) == len(set(seen.tolist())) == 96  # no repeats inside an epoch
  assert not np.array_equal(full[0]["labels"], full[12]["labels"])  # fresh order per epoch
  other = _take(batching.train_batches(ex, **{**kw, "seed": 8}), 1)[0]
  assert not np.array_equal(full[0]["labels"], other["labels"])


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_process_slices_union_to_global_batch(process_count, group_by_length):
  ex = _synthetic(123)
  kw = dict(global_batch_size=16, seed=1, start_step=5, max_length=128, pad_values=PAD,
            group_by_length=group_by_length)
  global_batches = _take(batching.train_batches(ex, **kw), 12)
  local = [_take(batching.train_batches(ex, process_index=p, process_count=process_count, **kw), 12)
           for p in range(process_count)]
  for step, want in enumerate(global_batches):
    parts = [local[p][step] for p in range(process_count)]
    assert all(p["input_ids"].shape == (16 // process_count, want["input_ids"].shape[1])
               for p in parts)  # same padded length on every process
    _assert_batches_equal([{k: np.concatenate([p[k] for p in parts]) for k in want}], [want])


@pytest.mark.parametrize("n", [1, 7, 16, 23, 50])
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_example_once(n, process_count):
  ex = _synthetic(n, seed=n)
  for sort in (False, True):
    per_step = [list(batching.eval_batches(ex, global_batch_size=8, max_length=128, pad_values=PAD,
                                           process_index=p, process_count=process_count,
                                           sort_by_length=sort))
                for p in range(process_count)]
    assert all(len(steps) == -(-n // 8) for steps in per_step)
    index, labels, preds = [], [], np.full(n, -1)
    for step in zip(*per_step):
      b = {k: np.concatenate([p[k] for p in step]) for k in step[0]}
      assert b["input_ids"].shape[0] == 8
      real = b["example_mask"] == 1
      np.testing.assert_array_equal(real, b["example_index"] >= 0)
      assert (b["labels"][~real] == 0).all() and (b["input_ids"][~real] == 0).all()
      # Dummy rows attend to one pad token only, so no attention row is fully masked.
      assert (b["attention_mask"][~real].sum(1) == 1).all()
      np.testing.assert_array_equal(b["attention_mask"][real].sum(1),
                                    ex.lengths()[b["example_index"][real]])
      index += b["example_index"][real].tolist()
      labels += b["labels"][real].tolist()
      preds[b["example_index"][real]] = b["labels"][real]  # how a caller restores order
    assert sorted(index) == list(range(n)) and labels == index
    np.testing.assert_array_equal(preds, np.arange(n))
    if sort:
      assert (np.diff(ex.lengths()[index]) <= 0).all()
    else:
      assert index == list(range(n))


# ---------------------------------------------------------------- real SST-2 length statistics


@pytest.fixture(scope="module")
def sst2_examples(data_dir, tokenizer):
  """A random 16384-row subset of SST-2 train, tokenized (the full file is only read)."""
  ds = sources.read_file(data_dir / GLUE / "SST-2/train.tsv")
  rows = np.sort(np.random.default_rng(0).choice(ds.num_rows, 16384, replace=False))
  sentences = sources.column_values(ds.select(rows), "sentence")
  return Examples(seqs=tokenize(tokenizer, [sentences], 128), values={"labels": rows})


def _pad_stats(batches):
  lengths = [b["input_ids"].shape[1] for b in batches]
  pad = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
  return float(np.mean(lengths)), pad


def test_sst2_padding_waste_and_group_by_length(sst2_examples):
  ex = sst2_examples
  steps = batching.steps_per_epoch(len(ex), 32)
  kw = dict(global_batch_size=32, seed=0, max_length=128, pad_values={"input_ids": 0})
  bucketed, pad_random = _pad_stats(_take(batching.train_batches(ex, **kw), steps))
  fixed, pad_fixed = _pad_stats(_take(batching.train_batches(ex, buckets=None, **kw), steps))
  _, pad_grouped = _pad_stats(_take(batching.train_batches(ex, group_by_length=True, **kw), steps))
  print(f"\nSST-2 ({len(ex)} rows, mean {ex.lengths().mean():.1f} tokens), batch 32: mean padded "
        f"length {bucketed:.1f} with DEFAULT_BUCKETS vs {fixed:.0f} fixed "
        f"({bucketed / fixed:.2f}x); pad tokens per epoch: fixed {pad_fixed}, random+buckets "
        f"{pad_random}, group_by_length+buckets {pad_grouped}")
  assert fixed == 128 and bucketed < 0.5 * 128
  assert pad_grouped < 0.5 * pad_random < pad_fixed
