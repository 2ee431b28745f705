"""The training engine on a tiny BERT: sharding parity, accumulation, export, resume, bad input."""

import json
import os

import jax
import numpy as np
import pytest

from engine_utils import (count_compiles, read_jsonl, tiny_bert_dir, tiny_config,
                          write_sentiment_tsv)
from flaxhf import sharding, xla_cpu
from flaxhf.models.base import flatten
from flaxhf.train import engine


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("engine")
  return dict(model=tiny_bert_dir(root / "model", minilm_path),
              train=write_sentiment_tsv(root / "train.tsv", 256, seed=0),
              dev=write_sentiment_tsv(root / "dev.tsv", 70, seed=1), root=root)


def train(setup, workdir, devices=None, **overrides):
  cfg = tiny_config(setup["model"], setup["train"], setup["dev"], **overrides)
  trainer = engine.Trainer(cfg, str(workdir), devices)
  try:
    results = trainer.fit()
  finally:
    trainer.ckpt.close()
  losses = [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  return trainer, results, np.array(losses)


@pytest.fixture(scope="module")
def one_device_losses(setup, tmp_path_factory):
  """The reference run on one device (fp32): the losses every sharded and bf16 run is held to."""
  return train(setup, tmp_path_factory.mktemp("one"), devices=jax.devices()[:1],
               **{"mesh.data": 1})[2]


@pytest.mark.parametrize("rules,mesh", [("dp", dict(data=8)), ("fsdp", dict(data=2, fsdp=4)),
                                        ("fsdp_tp", dict(data=2, fsdp=2, tensor=2))])
def test_sharded_training_matches_one_device(setup, tmp_path, rules, mesh, one_device_losses):
  want = one_device_losses
  overrides = {"mesh.rules": rules, "mesh.data": mesh.get("data", 1),
               "mesh.fsdp": mesh.get("fsdp", 1), "mesh.tensor": mesh.get("tensor", 1)}
  trainer, _, got = train(setup, tmp_path / rules, **overrides)
  assert len(got) == len(want) == 8
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Every parameter sits on the mesh exactly as its rule table says.
  specs = flatten(sharding.param_partition_specs(trainer.model, rules, trainer.mesh))
  for name, arr in flatten(trainer.state["params"]).items():
    assert arr.sharding.spec == specs[name], name
    shard = arr.addressable_shards[0].data.shape
    expect = tuple(d // int(np.prod([trainer.mesh.shape[a] for a in
                                     ((ax,) if isinstance(ax, str) else (ax or ()))]))
                   for d, ax in zip(arr.shape, tuple(specs[name]) + (None,) * arr.ndim))
    assert shard == expect, name
  if rules == "fsdp_tp":
    q = flatten(trainer.state["params"])["bert.encoder.layer.0.attention.self.query.weight"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_grad_accumulation_equals_big_batch(setup, tmp_path):
  _, _, want = train(setup, tmp_path / "k1", **{"train.grad_accum_steps": 1})
  _, _, got = train(setup, tmp_path / "k2", **{"train.grad_accum_steps": 2, "mesh.data": 4},
                    devices=jax.devices()[:4])
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_bf16_compute_keeps_fp32_params_and_learns(setup, tmp_path, caplog, one_device_losses):
  want = one_device_losses
  with caplog.at_level("WARNING", logger="flaxhf"):
    # On the fsdp_tp mesh: the bf16 dense layers' float32-accumulating dots (layers.dense) go
    # through the partitioner too.
    trainer, results, got = train(setup, tmp_path / "bf16", **{
        "mesh.rules": "fsdp_tp", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
        "model.dtype": "bfloat16"})
  # The advice to stay in float32 is for CPUs without bf16 matrix instructions only.
  assert ("use model.dtype=float32 on CPU" in caplog.text) != xla_cpu.f32_accumulating_dots()
  assert {a.dtype for a in jax.tree_util.tree_leaves(trainer.state["params"])} == {np.dtype("float32")}
  assert got[-1] < got[0]
  np.testing.assert_allclose(got, want, rtol=5e-2)  # the fp32 run's losses, to bf16 rounding


@pytest.mark.parametrize("buckets", [None, ()])
def test_train_step_compiles_once_per_bucket(setup, tmp_path, buckets):
  overrides = {"train.steps": 6, **({} if buckets is None else {"data.buckets": buckets})}
  cfg = tiny_config(setup["model"], setup["train"], setup["dev"], **overrides)
  trainer = engine.Trainer(cfg, str(tmp_path), jax.devices()[:1])
  step, lengths, compiles = trainer._train_step, set(), []

  def recording_step(state, batch):
    lengths.add(batch["input_ids"].shape)
    with count_compiles() as during:
      out = step(state, batch)
    compiles.extend(during)
    return out

  trainer._train_step = recording_step
  try:
    trainer.fit()
  finally:
    trainer.ckpt.close()
  # A second compile for the step's own (sharded) outputs would double the count.
  assert len(compiles) == len(lengths) >= 1
  if buckets == ():  # data.buckets=(): every batch padded to max_length, one program
    assert lengths == {(cfg.train.batch_size, cfg.data.max_length)}
  else:  # the smoke sentences are short: padded to a 16/24/32 bucket, below max_length 64
    assert all(length < cfg.data.max_length for _, length in lengths)


def test_bad_buckets_fail_before_loading(setup, tmp_path):
  cfg = tiny_config(setup["model"], setup["train"], setup["dev"], **{"data.buckets": (64, 0)})
  with pytest.raises(ValueError, match=r"data.buckets must be positive ints .* got \[0\]"):
    engine.Trainer(cfg, str(tmp_path), jax.devices()[:1])


def test_step_from_unplaced_params_compiles_once(setup):
  import flaxhf
  from configs.text_classification import get_config
  from flaxhf.data.text_classification import TaskData
  from flaxhf.train import tasks
  cfg = get_config("smoke")
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(setup["model"],
                                                                         num_labels=2)
  task = tasks.TextClassification(cfg)
  task.configure_model(model.config, TaskData(train=None, eval=None, label_list=None, num_labels=2,
                                              problem_type="single_label_classification"))
  state, step = engine.make_train_step(model, task, cfg.train, 10)  # params on the default device
  batch = {"input_ids": np.full((4, 16), 2000, np.int32), "attention_mask": np.ones((4, 16), np.int32),
           "token_type_ids": np.zeros((4, 16), np.int32), "labels": np.array([0, 1, 0, 1], np.int32)}
  state, metrics = step(state, batch)
  with count_compiles() as compiles:  # the first step's outputs feed the next: no recompile
    for _ in range(2):
      state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert compiles == []


@pytest.mark.xla_optimized  # 20 MiniLM steps at 16 x 64
def test_workdir_layout_export_and_rerun(setup, tmp_path, caplog, minilm_path):
  import torch
  import transformers
  # The real MiniLM checkpoint learns the synthetic sentiment task in a few steps.
  setup = dict(setup, model=minilm_path)
  # One device: the sharded runs above cover the mesh; 8 simulated devices on 2 cores only slow it.
  long_run = {"train.steps": 20, "train.batch_size": 16, "train.learning_rate": 1e-4,
              "checkpoint.every_steps": 8, "mesh.data": 1}
  trainer, results, losses = train(setup, tmp_path, jax.devices()[:1], **long_run)
  assert losses[-5:].mean() < losses[:5].mean() - 0.15
  assert results["accuracy"] > 0.9  # chance is ~0.5 on this balanced synthetic task
  for name in ("metrics.jsonl", "eval_results.json", "config.json", "export/config.json",
               "export/model.safetensors", "export/tokenizer_config.json"):
    assert os.path.exists(tmp_path / name), name
  assert sorted(trainer.ckpt.all_steps())[-1] == 20
  assert os.listdir(tmp_path / "tensorboard")
  saved = json.load(open(tmp_path / "eval_results.json"))
  assert saved["accuracy"] == pytest.approx(results["accuracy"])
  train_rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert {"step", "loss", "learning_rate"} <= set(train_rows[0])
  # The exported folder is a PyTorch model with flaxhf's dev predictions.
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  texts = [line.split("\t")[0] for line in open(setup["dev"]).read().splitlines()[1:]]
  labels = np.array([int(line.split("\t")[1]) for line in open(setup["dev"]).read().splitlines()[1:]])
  with torch.no_grad():
    logits = pt(**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
  acc = float((logits.argmax(-1) == labels).mean())
  assert acc == pytest.approx(results["accuracy"], abs=1e-9)
  # Rerunning the finished workdir resumes (nothing left to train) and says so.
  with caplog.at_level("WARNING", logger="flaxhf"):
    _, again, _ = train(setup, tmp_path, jax.devices()[:1], **long_run)
  assert "Resuming from step 20" in caplog.text
  assert again["accuracy"] == pytest.approx(results["accuracy"])


def test_bad_inputs_fail_clearly(setup, tmp_path):
  with pytest.raises(ValueError, match="text_columns|column"):
    train(setup, tmp_path / "a", **{"data.text_columns": "sentense"})
  empty = tmp_path / "empty.tsv"
  empty.write_text("sentence\tlabel\n")
  with pytest.raises(ValueError, match="empty"):
    cfg = tiny_config(setup["model"], str(empty), setup["dev"])
    engine.Trainer(cfg, str(tmp_path / "b"))
  dev = write_sentiment_tsv(tmp_path / "dev_str.tsv", 10, seed=3, string_labels=True)
  train_str = write_sentiment_tsv(tmp_path / "train_str.tsv", 64, seed=3, string_labels=True)
  with open(dev, "a") as f:
    f.write("a film\tmeh\n")
  with pytest.raises(ValueError, match="meh"):
    engine.Trainer(tiny_config(setup["model"], train_str, dev), str(tmp_path / "c"))
  cfg = tiny_config(setup["model"], setup["train"], setup["dev"])
  cfg.model.name_or_path = "bert-base-uncased"  # a hub id, but the hub is off in tests
  with pytest.raises(OSError, match="local folder"):
    engine.Trainer(cfg, str(tmp_path / "d"))
  with pytest.raises(ValueError, match="multiple"):
    engine.Trainer(tiny_config(setup["model"], setup["train"], setup["dev"],
                               **{"train.batch_size": 12}), str(tmp_path / "e"))


def test_llama_fsdp_tp_equals_one_device():
  """A tiny Llama (GQA, untied head) trained 3 steps on a data x fsdp x tensor = 2x2x2 mesh under
  fsdp_tp lands on the one-device run's losses and weights (make_train_step, as a custom loop)."""
  import transformers

  import flaxhf
  from configs.clm import get_config
  from flaxhf.train.tasks_clm import CausalLM
  config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
  cfg = get_config("smoke")
  cfg.unlock()
  cfg.train.learning_rate = 1e-2
  rng = np.random.RandomState(0)
  batch = {"input_ids": rng.randint(0, 96, (8, 16)).astype(np.int32),
           "attention_mask": np.ones((8, 16), np.int32)}
  batches = [batch] * 3  # the same rows: the loss must fall
  runs = {}
  for name, (mesh, rules) in {
      "one": (sharding.make_mesh(data=1, devices=jax.devices()[:1]), "dp"),
      "fsdp_tp": (sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8]),
                  "fsdp_tp")}.items():
    model = flaxhf.FlaxLlamaForCausalLM(config, seed=0)
    state, step = engine.make_train_step(model, CausalLM(cfg), cfg.train, 3, mesh=mesh, rules=rules)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    runs[name] = (losses, jax.device_get(flatten(state["params"])), state)
  (want, want_w, _), (got, got_w, state) = runs["one"], runs["fsdp_tp"]
  assert want[-1] < want[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in want_w:  # Adam moves a near-zero gradient's entry by ~lr whatever its rounding: atol
    np.testing.assert_allclose(got_w[k], want_w[k], rtol=1e-4, atol=1e-5, err_msg=k)
  q = flatten(state["params"])["model.layers.0.self_attn.q_proj.weight"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
