"""Token classification and multiple choice: data preparation, and real-data runs on the engine."""

import json
import os

import jax
import numpy as np
import pytest

from engine_utils import read_jsonl
from flaxhf.data import multiple_choice as mc
from flaxhf.data import token_classification as tc
from flaxhf.data.sources import DataError
from flaxhf.train import engine


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


def _cfg(module, arg, **overrides):
  """A config from configs/<module>.py:<arg>, with dotted-key overrides."""
  import importlib
  cfg = importlib.import_module(f"configs.{module}").get_config(arg)
  cfg.update_from_flattened_dict(overrides)  # dotted keys; the lock still rejects typos
  return cfg


def _data_cfg(**values):
  """A data config for the prepare functions: a plain dict is enough for `get_option`."""
  return {"max_length": 32, **values}


def _write(path, text):
  path.write_text(text)
  return str(path)


def _write_jsonl(path, rows):
  return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _run_capturing(trainer):
  """Runs fit(), keeping the per-example predictions of its final evaluation."""
  captured, metrics = {}, trainer.task.metrics

  def capture(predictions, task_data):
    captured["predictions"] = predictions
    return metrics(predictions, task_data)

  trainer.task.metrics = capture
  try:
    results = trainer.fit()
  finally:
    trainer.ckpt.close()
  return results, captured["predictions"]


def _padded(examples, fields=("input_ids", "attention_mask", "token_type_ids")):
  """All examples padded to one length (0 is MiniLM's pad id), as torch tensors."""
  import torch
  longest = int(examples.lengths().max())
  out = {}
  for f in fields:
    rows = examples.seqs[f] if f in examples.seqs else [np.ones_like(a) for a in
                                                        examples.seqs["input_ids"]]
    arr = np.zeros((len(rows),) + rows[0].shape[:-1] + (longest,), np.int64)
    for i, a in enumerate(rows):
      arr[i, ..., :a.shape[-1]] = a
    out[f] = torch.from_numpy(arr)
  return out


# ---- token classification: data ------------------------------------------------------------------
CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter\tNNP\tB-NP\tB-PER
Blackburn\tNNP\tI-NP\tI-PER


BRUSSELS NNP B-NP B-LOC"""


def test_read_conll(tmp_path):
  tokens, tags = tc.read_conll(_write(tmp_path / "a.txt", CONLL))
  assert tokens == [["EU", "rejects", "German"], ["Peter", "Blackburn"], ["BRUSSELS"]]
  assert tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"], ["B-LOC"]]  # the LAST column
  with pytest.raises(DataError, match=r"b\.txt:2.*token \.\.\. tag"):
    tc.read_conll(_write(tmp_path / "b.txt", "EU B-ORG\nrejects\n"))
  with pytest.raises(DataError, match="no sentences"):
    tc.read_conll(_write(tmp_path / "c.txt", "-DOCSTART- O\n\n"))


def test_align_labels():
  #            [CLS] eu   black burn  ##x  1996 -   [SEP]
  word_ids = [None, 0, 1, 1, 1, 2, 2, None]
  b_to_i = [0, 2, 2]  # O, B-PER, I-PER: B-PER continues as I-PER
  np.testing.assert_array_equal(tc.align_labels(word_ids, [0, 1, 0], False, b_to_i),
                                [-100, 0, 1, -100, -100, 0, -100, -100])
  np.testing.assert_array_equal(tc.align_labels(word_ids, [0, 1, 0], True, b_to_i),
                                [-100, 0, 1, 2, 2, 0, 0, -100])
  pos, words = tc.first_subtokens(word_ids)
  np.testing.assert_array_equal(pos, [1, 2, 5])
  np.testing.assert_array_equal(words, [0, 1, 2])


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_prepare_conll_aligns_sub_tokens(tmp_path, tokenizer, label_all_tokens):
  path = _write(tmp_path / "a.conll", "Peter B-PER\nBlackburn I-PER\nlambs O\n\u200b O\nEU B-ORG\n")
  data = tc.prepare_token_classification(
      _data_cfg(train_file=path, validation_file=path, label_all_tokens=label_all_tokens),
      tokenizer)
  assert data.label_list == ["B-ORG", "B-PER", "I-PER", "O"]  # sorted tags of the train split
  ids = data.train.seqs["input_ids"][0]
  tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
  assert tokens == ["[CLS]", "peter", "blackburn", "lamb", "##s", "eu", "[SEP]"]
  b_org, b_per, i_per, o = range(4)
  rest = o if label_all_tokens else -100
  np.testing.assert_array_equal(data.train.seqs["labels"][0],
                                [-100, b_per, i_per, o, rest, b_org, -100])
  # The zero-width word has no sub-token: it is neither labelled nor scored.
  assert data.eval_raw.tags == [["B-PER", "I-PER", "O", "B-ORG"]]
  np.testing.assert_array_equal(data.eval_raw.starts[0], [1, 2, 3, 5])
  assert data.eval_raw.dropped_words == 1
  assert data.pad_values["labels"] == -100


def test_prepare_truncates_and_counts_dropped_words(tmp_path, tokenizer):
  path = _write(tmp_path / "long.txt", "".join(f"w{i} O\n" for i in range(40)))
  data = tc.prepare_token_classification(
      _data_cfg(train_file=path, validation_file=path, max_length=16), tokenizer)
  assert len(data.train.seqs["input_ids"][0]) == 16
  assert len(data.eval_raw.tags[0]) + data.eval_raw.dropped_words == 40


def test_tag_outside_label_list_is_an_error(tmp_path, tokenizer):
  train = _write(tmp_path / "train.txt", "Peter B-PER\nsaid O\n")
  dev = _write(tmp_path / "dev.txt", "Paris B-LOC\nsaid O\n")
  with pytest.raises(DataError, match=r"B-LOC.*known labels \['B-PER', 'O'\]"):
    tc.prepare_token_classification(_data_cfg(train_file=train, validation_file=dev), tokenizer)
  # Naming the tags fixes the label list (and its order).
  data = tc.prepare_token_classification(
      _data_cfg(train_file=train, validation_file=dev, label_list="O,B-PER,B-LOC"), tokenizer)
  assert data.label_list == ["O", "B-PER", "B-LOC"] and data.num_labels == 3


def test_json_columns_and_integer_tags(tmp_path, tokenizer, data_dir):
  sample = str(data_dir / "hf_tests_samples" / "conll" / "sample.json")
  data = tc.prepare_token_classification(
      _data_cfg(train_file=sample, validation_file=sample, tokens_column="words",
                tags_column="ner"), tokenizer)
  assert len(data.train) == 10 and "B-PER" in data.label_list and data.label_list == sorted(
      data.label_list)
  with pytest.raises(DataError, match="tokens_column"):
    tc.prepare_token_classification(_data_cfg(train_file=sample), tokenizer)
  rows = [{"tokens": ["Peter", "said"], "ner_tags": [1, 0]}, {"tokens": ["EU"], "ner_tags": [2]}]
  path = _write_jsonl(tmp_path / "ints.jsonl", rows)
  data = tc.prepare_token_classification(
      _data_cfg(train_file=path, validation_file=path, label_list="O,B-PER,B-ORG"), tokenizer)
  assert data.eval_raw.tags == [["B-PER", "O"], ["B-ORG"]]
  with pytest.raises(DataError, match="label_list"):
    tc.prepare_token_classification(_data_cfg(train_file=path), tokenizer)
  with pytest.raises(DataError, match=r"row 0: 2 tokens but 1 tags"):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    tc.prepare_token_classification(_data_cfg(train_file=bad), tokenizer)



def test_hub_class_label_tags(monkeypatch, tokenizer):
  import datasets
  features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                "ner_tags": datasets.List(datasets.ClassLabel(
                                    names=["O", "B-PER", "I-PER"]))})
  ds = datasets.Dataset.from_dict({"tokens": [["Peter", "Blackburn", "said"]],
                                   "ner_tags": [[1, 2, 0]]}, features=features)
  monkeypatch.setattr(tc.sources, "load_splits", lambda cfg: {"train": ds, "validation": ds})
  data = tc.prepare_token_classification(_data_cfg(dataset="conll2003"), tokenizer)
  assert data.label_list == ["O", "B-PER", "I-PER"]  # ClassLabel order, as the hub has it
  np.testing.assert_array_equal(data.train.seqs["labels"][0], [-100, 1, 2, 0, -100])
  # A reordered data.label_list re-indexes the ClassLabel ids by name.
  data = tc.prepare_token_classification(
      _data_cfg(dataset="conll2003", label_list="B-PER,I-PER,O"), tokenizer)
  np.testing.assert_array_equal(data.train.seqs["labels"][0], [-100, 0, 1, 2, -100])
  assert data.eval_raw.tags == [["B-PER", "I-PER", "O"]]

# ---- multiple choice: data -----------------------------------------------------------------------
def _swag_rows(n, choices=4):
  return [{"sent1": f"Context {i}.", "sent2": "She", "label": i % choices,
           **{f"ending{c}": f"ending {c} of row {i}" for c in range(choices)}} for i in range(n)]


def test_multiple_choice_infers_choices_and_pads_inside_example(tmp_path, tokenizer):
  path = _write_jsonl(tmp_path / "five.jsonl", _swag_rows(6, choices=5))
  data = mc.prepare_multiple_choice(_data_cfg(train_file=path, validation_file=path), tokenizer)
  assert data.num_labels == 5 and len(data.train) == 6
  ids, mask = data.train.seqs["input_ids"][0], data.train.seqs["attention_mask"][0]
  assert ids.shape == mask.shape == data.train.seqs["token_type_ids"][0].shape
  assert ids.shape[0] == 5
  assert tokenizer.decode(ids[2][mask[2] == 1]) == (
      "[CLS] context 0. [SEP] she ending 2 of row 0 [SEP]")
  np.testing.assert_array_equal(data.train.values["labels"], [0, 1, 2, 3, 4, 0])
  # Explicit ending columns override the prefix; gaps in the numbering are refused.
  rows = [dict(r, label=r["label"] % 2) for r in _swag_rows(4, choices=5)]
  path = _write_jsonl(tmp_path / "two.jsonl", rows)
  data = mc.prepare_multiple_choice(_data_cfg(train_file=path, ending_columns="ending4,ending0"),
                                    tokenizer)
  assert data.num_labels == 2
  assert tokenizer.decode(data.train.seqs["input_ids"][0][0]).endswith("ending 4 of row 0 [SEP]")
  gap = [{k: v for k, v in r.items() if k != "ending1"} for r in _swag_rows(2, choices=3)]
  with pytest.raises(DataError, match=r"numbered \[0, 2\]"):
    mc.prepare_multiple_choice(_data_cfg(train_file=_write_jsonl(tmp_path / "gap.jsonl", gap)),
                               tokenizer)


def test_multiple_choice_bad_rows_fail_clearly(tmp_path, tokenizer):
  rows = _swag_rows(5)
  rows[3]["ending2"] = "  "
  with pytest.raises(DataError, match=r"empty ending in column 'ending2' at row\(s\) \[3\]"):
    mc.prepare_multiple_choice(_data_cfg(train_file=_write_jsonl(tmp_path / "a.jsonl", rows)),
                               tokenizer)
  rows = _swag_rows(5)
  rows[1]["label"] = -1  # SWAG's unlabelled test rows
  with pytest.raises(DataError, match=r"row 1: label -1 .* 0\.\.3"):
    mc.prepare_multiple_choice(_data_cfg(train_file=_write_jsonl(tmp_path / "b.jsonl", rows)),
                               tokenizer)
  with pytest.raises(DataError, match="ending_prefix"):
    mc.prepare_multiple_choice(_data_cfg(train_file=_write_jsonl(tmp_path / "c.jsonl", rows),
                                         ending_prefix="option"), tokenizer)
  with pytest.raises(DataError, match="context_column"):
    mc.prepare_multiple_choice(_data_cfg(train_file=_write_jsonl(tmp_path / "d.jsonl", rows),
                                         context_column="premise"), tokenizer)


def test_local_configs_point_at_the_real_data(data_dir):
  ner = _cfg("token_classification", "local,label_all_tokens")
  assert ner.data.label_all_tokens and os.path.isfile(ner.data.train_file)
  assert os.path.isfile(ner.data.validation_file)
  choice = _cfg("multiple_choice", "local,smoke")
  assert os.path.isfile(choice.data.train_file) and choice.train.steps == 8
  assert _cfg("token_classification", "").data.dataset == "conll2003"


# ---- real-data runs through the engine -----------------------------------------------------------
@pytest.mark.xla_optimized  # 80 MiniLM steps: the steps dominate
def test_ner_conll_slice_trains_and_exports(data_dir, minilm_path, tmp_path):
  import torch
  import transformers
  # 80 steps of 16 sentences (~0.9 epochs of 1500), ~50 s alone on 2 CPU cores. max_length 32
  # (one shape: one compilation each for train and eval) cuts ~8% of the eval words, which are
  # then neither trained on nor scored.
  cfg = _cfg("token_classification", "local", **{
      "data.max_length": 32, "data.buckets": (32,), "data.max_train_samples": 1500,
      "data.max_eval_samples": 300,
      "data.group_by_length": True, "train.steps": 80, "train.batch_size": 16,
      "train.eval_batch_size": 64, "train.learning_rate": 5e-4, "train.eval_every": 0,
      "train.log_every": 10, "train.progress_bar": False, "mesh.data": 1,
      "checkpoint.every_steps": 1000, "checkpoint.async_save": False})
  trainer = engine.Trainer(cfg, str(tmp_path), jax.devices()[:1])
  untrained = trainer.evaluate()
  results, preds = _run_capturing(trainer)
  print(f"NER untrained f1={untrained['f1']:.3f}; trained {results}; "
        f"{trainer.data.eval_raw.dropped_words} eval words cut")
  assert untrained["f1"] < 0.15  # a random head: measured 0.047
  assert results["f1"] > 0.55 and results["accuracy"] > 0.88  # measured 0.601 / 0.911
  assert results["PER_f1"] > 0.7  # measured 0.818
  # The export is a PyTorch token classifier with flaxhf's dev predictions.
  export = tmp_path / "export"
  pt = transformers.AutoModelForTokenClassification.from_pretrained(export).eval()
  assert pt.config.id2label[0] == "B-LOC" and pt.config.num_labels == 9
  inputs = _padded(trainer.data.eval)
  with torch.no_grad():
    pt_ids = pt(**inputs).logits.argmax(-1).numpy()
  for i, (p, starts) in enumerate(zip(preds, trainer.data.eval_raw.starts)):
    np.testing.assert_array_equal(pt_ids[i][starts], p[starts], err_msg=f"sentence {i}")
  pt_metrics = trainer.task.metrics(list(pt_ids), trainer.data)
  assert pt_metrics["f1"] == pytest.approx(results["f1"], abs=1e-12)


@pytest.mark.xla_optimized  # 12 MiniLM steps of 4 choices each: 2.2 s a step unoptimised
def test_multiple_choice_swag_sample_learns_and_exports(data_dir, minilm_path, tmp_path):
  import torch
  import transformers
  sample = str(data_dir / "hf_tests_samples" / "swag" / "sample.json")
  cfg = _cfg("multiple_choice", "local,smoke", **{
      "data.train_file": sample, "data.validation_file": sample, "data.max_eval_samples": None,
      "train.steps": 12, "train.learning_rate": 3e-4, "train.log_every": 1,
      "train.progress_bar": False, "mesh.data": 1, "checkpoint.every_steps": 1000,
      "checkpoint.async_save": False})
  trainer = engine.Trainer(cfg, str(tmp_path), jax.devices()[:1])
  assert trainer.data.num_labels == 4 and trainer.data.train.seqs["input_ids"][0].shape[0] == 4
  results, preds = _run_capturing(trainer)
  losses = np.array([r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")])
  print(f"MC sample losses {np.round(losses, 3).tolist()}; {results}")
  assert len(losses) == 12 and losses[-3:].mean() < losses[:3].mean() - 0.3
  assert results["accuracy"] >= 0.7  # the 10 training rows, memorised (chance 0.25)
  pt = transformers.AutoModelForMultipleChoice.from_pretrained(tmp_path / "export").eval()
  inputs = _padded(trainer.data.eval)
  with torch.no_grad():
    pt_logits = pt(**inputs).logits.numpy()
  np.testing.assert_array_equal(pt_logits.argmax(-1), np.stack(preds))
  flax_logits = trainer.model(**{k: v.numpy() for k, v in inputs.items()},
                              params=trainer.state["params"]).logits
  np.testing.assert_allclose(pt_logits, np.asarray(flax_logits), atol=1e-4)


@pytest.mark.slow
def test_ner_conll_longer_run(data_dir, minilm_path, tmp_path):
  cfg = _cfg("token_classification", "local", **{
      "data.max_length": 64, "data.max_train_samples": 5000, "data.max_eval_samples": 1000,
      "data.group_by_length": True, "train.steps": 500, "train.batch_size": 32,
      "train.learning_rate": 2e-4, "train.eval_every": 0, "train.progress_bar": False,
      "mesh.data": 1, "checkpoint.every_steps": 1000})
  results = engine.run(cfg, str(tmp_path), jax.devices()[:1])
  print(f"NER longer run: {results}")
  assert results["f1"] > 0.8  # measured 0.879 (PER 0.94, MISC 0.73)


@pytest.mark.slow
def test_multiple_choice_codah(data_dir, minilm_path, tmp_path):
  cfg = _cfg("multiple_choice", "local", **{"train.progress_bar": False, "mesh.data": 1,
                                             "train.eval_every": 0})
  results = engine.run(cfg, str(tmp_path), jax.devices()[:1])
  print(f"CODAH: {results}")
  assert results["accuracy"] > 0.45  # chance is 0.25; measured 0.523 / 0.538 / 0.547 by epoch
