"""LoRA: flaxhf adapters load in peft and peft's load in flaxhf (same logits, merge_and_unload ==
the merged export), the optimizer holds adapter state only, exact resume, a CLI run that learns."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import flaxhf
from flaxhf import lora
from flaxhf.models.base import flatten
from model_utils import VOCAB, make_inputs
from engine_utils import child_env

peft = pytest.importorskip("peft")

_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
             decoder_ffn_dim=48, max_position_embeddings=64)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16,
           decoder_start_token_id=0)


def _seq2seq_inputs(batch=2, src=9, tgt=6, seed=0):
  rng = np.random.RandomState(seed)
  mask, dec_mask = np.ones((batch, src), np.int64), np.ones((batch, tgt), np.int64)
  mask[-1, src - 3:], dec_mask[-1, tgt - 2:] = 0, 0
  return {"input_ids": rng.randint(3, VOCAB, (batch, src)) * mask, "attention_mask": mask,
          "decoder_input_ids": rng.randint(3, VOCAB, (batch, tgt)) * dec_mask,
          "decoder_attention_mask": dec_mask}


# family -> (PyTorch model, flaxhf class, LoraConfig kwargs, inputs). One per export path: GPT-2's
# Conv1D (fan_in_fan_out) with rsLoRA, BERT's classifier as modules_to_save, BART with a regex
# target, T5 with peft's default q/v, Llama's GQA projections and MLP.
FAMILIES = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
        flaxhf.FlaxGPT2LMHeadModel, dict(use_rslora=True), lambda: make_inputs("gpt2", "causal_lm")),
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)),
        flaxhf.FlaxBertForSequenceClassification, {},
        lambda: make_inputs("bert", "sequence_classification")),
    "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(**_BART)),
             flaxhf.FlaxBartForConditionalGeneration,
             dict(target_modules=r".*decoder\.layers\.\d+\.(self_attn\.q_proj|fc1)"), _seq2seq_inputs),
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**_T5)),
           flaxhf.FlaxT5ForConditionalGeneration, {}, _seq2seq_inputs),
    # Grouped-query attention (k_proj/v_proj narrower than q_proj) and every linear a target.
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
        flaxhf.FlaxLlamaForCausalLM, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"]),
        lambda: make_inputs("gpt2", "causal_lm")),
    # Phi-3's fused qkv_proj / gate_up_proj (peft has no default for it: named here).
    "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)),
        flaxhf.FlaxPhi3ForCausalLM, dict(target_modules=["qkv_proj", "gate_up_proj"]),
        lambda: make_inputs("gpt2", "causal_lm")),
    # Gemma 2 with peft's default targets (q_proj, v_proj) and its soft-capped logits.
    "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        pad_token_id=0)), flaxhf.FlaxGemma2ForCausalLM, {}, lambda: make_inputs("gpt2", "causal_lm")),
}


def _torch_logits(model, inputs):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def _randomize(tree, seed):
  """Non-zero adapters (peft's init has B = 0, which would hide a transposed or misnamed A/B)."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda x: jnp.asarray(x + rng.normal(0, 0.1, x.shape).astype(np.float32)), tree)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapters_both_ways(family, tmp_path):
  make_torch, cls, kwargs, make = FAMILIES[family]
  torch.manual_seed(0)
  make_torch().eval().save_pretrained(tmp_path / "base")
  fresh_torch = lambda: type(make_torch()).from_pretrained(tmp_path / "base").eval()  # noqa: E731
  inputs = make()

  # flaxhf -> peft: the adapter folder loads with no missing keys and the same logits.
  model = cls.from_pretrained(tmp_path / "base")
  spec = lora.Lora(model, lora.LoraConfig(r=4, lora_alpha=8, **kwargs))
  trainable = _randomize(spec.init(jax.random.key(0), model.params), seed=1)
  joined = spec.join(trainable, spec.frozen(model.params))
  with spec.intercept():  # the training forward: base(x) + s B A x, unmerged
    unmerged = np.asarray(model(**inputs, params=joined).logits)
  merged = spec.merge(joined)
  ours = np.asarray(model(**inputs, params=merged).logits)
  spec.save(tmp_path / "adapter", trainable, base_model_name_or_path=str(tmp_path / "base"))
  model.save_pretrained(tmp_path / "merged", params=merged)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    peft_model = peft.PeftModel.from_pretrained(fresh_torch(), tmp_path / "adapter").eval()
  assert not [w for w in caught if "adapter keys" in str(w.message)]
  # The file holds exactly the keys and shapes peft itself would save for this adapter.
  written = load_file(tmp_path / "adapter" / lora.ADAPTER_WEIGHTS)
  expected = peft.get_peft_model_state_dict(peft_model)
  assert {k: tuple(v.shape) for k, v in written.items()} == {
      k: tuple(v.shape) for k, v in expected.items()}
  want = _torch_logits(peft_model, inputs)
  np.testing.assert_allclose(ours, want, atol=1e-5)
  np.testing.assert_allclose(unmerged, want, atol=1e-5)
  assert np.abs(want - _torch_logits(fresh_torch(), inputs)).max() > 1e-3  # the adapter matters
  # merge_and_unload() == flaxhf's merged export, tensor by tensor.
  torch_merged = peft_model.merge_and_unload().state_dict()
  exported = load_file(tmp_path / "merged" / "model.safetensors")
  assert set(exported) <= set(torch_merged)
  for k, v in exported.items():
    np.testing.assert_allclose(v, torch_merged[k].numpy(), atol=1e-6, err_msg=k)

  # peft -> flaxhf: an adapter made by get_peft_model(...).save_pretrained runs with the same logits.
  config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG).read_text())
  made = peft.get_peft_model(fresh_torch(), peft.LoraConfig(
      task_type=config["task_type"], r=4, lora_alpha=8, init_lora_weights=False,
      target_modules=config["target_modules"], use_rslora=config["use_rslora"],
      fan_in_fan_out=config["fan_in_fan_out"]))
  with torch.no_grad():
    for name, p in made.named_parameters():
      if "modules_to_save" in name or "lora_B" in name:
        p.add_(torch.randn_like(p) * 0.1)
  made.save_pretrained(tmp_path / "from_peft")
  want = _torch_logits(made.eval(), inputs)
  loaded = cls.from_pretrained(tmp_path / "base", adapter=tmp_path / "from_peft")
  np.testing.assert_allclose(np.asarray(loaded(**inputs).logits), want, atol=1e-5)
  spec2, trainable2 = lora.load_adapter(model, str(tmp_path / "from_peft"), model.params)
  with spec2.intercept():  # imported to train on: the unmerged forward agrees too
    again = model(**inputs, params=spec2.join(trainable2, spec2.frozen(model.params))).logits
  np.testing.assert_allclose(np.asarray(again), want, atol=1e-5)


def test_default_targets_are_peft_s():
  from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map
  assert {t: peft_map[t] for t in lora.PEFT_DEFAULT_TARGETS} == lora.PEFT_DEFAULT_TARGETS
  assert not set(lora.FLAXHF_DEFAULT_TARGETS) & set(peft_map)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_all_linear_targets_are_peft_s(family):
  """target_modules="all-linear" picks the modules peft picks: every Linear/Conv1D but the output
  layer (peft writes the names it found; so does flaxhf)."""
  pt, cls, _, _ = FAMILIES[family]
  pt = pt()
  wrapped = peft.get_peft_model(pt, peft.LoraConfig(r=2, target_modules="all-linear"))
  want = {n[len("base_model.model."):] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
  model = cls(pt.config, _do_init=False)
  ours = lora.Lora(model, lora.LoraConfig(r=2, target_modules="all-linear"))
  assert {n for t in ours.targets.values() for n in t.names} == want
  assert "lm_head" not in want and len(want) > 4


def _tiny_bert(task_cls=flaxhf.FlaxBertForSequenceClassification, hidden=32, **kw):
  config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, num_labels=2, **kw)
  return task_cls(config, _do_init=False)


def test_bad_targets_and_adapters_fail_clearly(tmp_path):
  model = _tiny_bert()
  with pytest.raises(ValueError, match=r"match no module.*'query'.*'value'"):
    lora.Lora(model, lora.LoraConfig(target_modules=["q_proj"]))
  with pytest.raises(ValueError, match="not Linear/Conv1D.*LayerNorm"):
    lora.Lora(model, lora.LoraConfig(target_modules=["LayerNorm"]))
  with pytest.raises(ValueError, match="modules_to_save.*'classifer'"):
    lora.Lora(model, lora.LoraConfig(modules_to_save=("classifer",)))
  # An adapter trained on another base size: the shapes are named, not a broadcasting error.
  small = _tiny_bert(flaxhf.FlaxBertModel)
  spec = lora.Lora(small, lora.LoraConfig(r=4))
  abstract = jax.tree_util.tree_map(lambda s: np.zeros(s, np.float32), small.param_shapes(),
                                    is_leaf=lambda x: isinstance(x, tuple))
  spec.save(tmp_path / "adapter", spec.init(jax.random.key(0), abstract))
  wide = _tiny_bert(flaxhf.FlaxBertModel, hidden=48)
  with pytest.raises(ValueError, match=r"does not fit FlaxBertModel.*lora_A.weight is \[4, 32\].*"
                                       r"needs \[4, 48\]"):
    lora.load_adapter(wide, str(tmp_path / "adapter"), None)
  config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG).read_text())
  (tmp_path / "adapter" / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="does not implement.*use_dora"):
    lora.load_adapter(small, str(tmp_path / "adapter"), None)


def test_optimizer_state_holds_the_adapters_only():
  from configs.text_classification import get_config
  from flaxhf import sharding
  from flaxhf.train import memory
  from flaxhf.train.tasks import TextClassification
  model, cfg = _tiny_bert(), get_config("smoke")
  spec = lora.Lora(model, lora.LoraConfig(r=4))
  mesh = sharding.make_mesh(2, 2, 2)
  _, state = memory.abstract_train_step(model, TextClassification(cfg), cfg.train, mesh, "fsdp_tp",
                                        lora=spec, frozen_dtype=jnp.bfloat16)
  trainable = flatten(state["params"])
  assert sorted(trainable) == sorted(
      [f"bert.encoder.layer.{i}.attention.self.{m}.lora_{w}.weight" for i in range(2)
       for m in ("query", "value") for w in "AB"] + ["classifier.bias", "classifier.weight"])
  # AdamW's two moments of exactly these arrays, plus its step counters: nothing of the base.
  adam_bytes = 2 * sum(x.size * 4 for x in trainable.values())
  opt = jax.tree_util.tree_leaves(state["opt_state"])
  assert sum(x.size * x.dtype.itemsize for x in opt) - adam_bytes == sum(
      x.dtype.itemsize for x in opt if x.shape == ())
  base_bytes = sum(int(np.prod(s)) * 4 for s in flatten(model.param_shapes()).values())
  frozen = jax.tree_util.tree_leaves(state["frozen"])
  assert {x.dtype for x in frozen} == {jnp.dtype(jnp.bfloat16)}
  assert sum(x.size * 2 for x in frozen) + 2 * (32 * 2 + 2) == base_bytes // 2  # - classifier
  # Adapters follow their weight's rule: query [heads, embed] -> A [-, embed], B [heads, -].
  q = "bert.encoder.layer.0.attention.self.query"
  P = jax.sharding.PartitionSpec
  assert trainable[q + ".lora_A.weight"].sharding.spec == P(None, "fsdp")
  assert trainable[q + ".lora_B.weight"].sharding.spec == P("tensor", None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm_path):
  from engine_utils import write_sentiment_tsv
  root = tmp_path_factory.mktemp("lora_runs")
  # MiniLM's first two layers: pretrained word vectors make a 30-step LoRA run learn, and two
  # layers keep it seconds long.
  base = transformers.BertForSequenceClassification.from_pretrained(
      minilm_path, num_hidden_layers=2, num_labels=2)
  base.bert.save_pretrained(root / "minilm2")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(minilm_path, name)):
      shutil.copy(os.path.join(minilm_path, name), root / "minilm2")
  return dict(model=str(root / "minilm2"), train=write_sentiment_tsv(root / "train.tsv", 320, 0),
              dev=write_sentiment_tsv(root / "dev.tsv", 64, 1))


def _run(runs, workdir, **overrides):
  from engine_utils import tiny_config
  from flaxhf.train import engine
  cfg = tiny_config(runs["model"], runs["train"], runs["dev"], **overrides)
  trainer = engine.Trainer(cfg, str(workdir), jax.devices()[:1])
  try:
    trainer.fit()
  finally:
    trainer.ckpt.close()
  return trainer


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(runs, tmp_path):
  from flaxhf.checkpoint import restore_arrays
  overrides = {"model.lora.r": 4, "model.lora.lora_dropout": 0.1, "model.lora.base_dtype": "bfloat16",
               "train.steps": 4, "checkpoint.every_steps": 2, "mesh.data": 1, "data.buckets": (32,)}
  whole = _run(runs, tmp_path / "whole", **overrides)
  assert {x.dtype for x in jax.tree_util.tree_leaves(whole.state["frozen"])} == {jnp.dtype("bfloat16")}
  saved = restore_arrays(str(tmp_path / "whole" / "checkpoints" / "2"))
  assert "frozen" not in saved and set(flatten(saved["params"])) == set(flatten(whole.state["params"]))
  # A run that stopped after step 2 continues to the same adapters, bit for bit.
  shutil.copytree(tmp_path / "whole" / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
  _run(runs, tmp_path / "resumed", **overrides)
  for name in ("adapter/adapter_model.safetensors", "export/model.safetensors"):
    want, got = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")


def _predict(model, tokenizer, texts, **kw):
  enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="np")  # the run's
  if isinstance(model, torch.nn.Module):
    with torch.no_grad():
      return model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy().argmax(-1)
  return np.asarray(model(**enc, **kw).logits).argmax(-1)


def test_cli_lora_run_learns_and_peft_predicts_the_same(minilm_path, tmp_path, data_dir):
  """LoRA through the CLI on GLUE SST-2 (960 of its train sentences, the first 128 of dev) with the
  MiniLM checkpoint as the base: accuracy well above the untrained model's (measured 0.469 -> 0.758
  after 40 steps; 0.789 after 60 and after 100), and PyTorch + peft on
  the base and the adapter folder predicts what flaxhf's merged export predicts."""
  from flaxhf.data.sources import read_file
  sst2 = data_dir / "text_classification" / "glue" / "SST-2"
  dev = tmp_path / "dev.tsv"
  with open(sst2 / "dev.tsv") as f:
    dev.write_text("".join(line for _, line in zip(range(129), f)))  # the header + 128 rows
  workdir = tmp_path / "run"
  overrides = {"model.name_or_path": minilm_path, "data.train_file": str(sst2 / "train.tsv"),
               "data.max_train_samples": 1600, "data.max_eval_samples": 128,
               "data.validation_file": str(dev), "data.dataset": "", "data.subset": "",
               "data.task_name": "", "data.text_columns": "sentence", "data.max_length": 32,
               "data.buckets": "(32,)", "train.steps": 40, "train.batch_size": 16,
               "train.learning_rate": 3e-3, "train.progress_bar": False, "mesh.data": 1,
               "train.eval_on_start": True,  # the untrained numbers: base + zero adapters + new head
               "model.lora.r": 8, "model.lora.lora_alpha": 16,
               "model.lora.target_modules": "query,key,value,dense"}
  env = child_env()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "launch/run.py", "--config",
                         "configs/text_classification.py:smoke", "--workdir", str(workdir),
                         *(f"--config.{k}={v}" for k, v in overrides.items())],
                        cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The logged memory: AdamW's two moments of what trains (adapters + classifier), none of the base.
  mem = dict(re.findall(r"(params|opt_state|frozen) ([0-9.]+)", proc.stderr.split(
      "Train step memory per device (MiB): ")[1].splitlines()[0]))
  assert float(mem["opt_state"]) == pytest.approx(2 * float(mem["params"]), abs=0.1), mem
  assert float(mem["opt_state"]) < float(mem["frozen"]) / 20, mem
  results = json.loads((workdir / "eval_results.json").read_text())
  rows = read_file(str(dev))  # as the task reads it
  texts, labels = list(rows["sentence"]), np.array(rows["label"], dtype=np.int64)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  from engine_utils import eval_on_start_metrics
  before = eval_on_start_metrics(workdir)["accuracy"]
  ours = _predict(flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(
      workdir / "export"), tokenizer, texts)
  assert results["accuracy"] == pytest.approx((ours == labels).mean())
  assert results["accuracy"] >= max(before + 0.1, 0.65), (before, results)
  # PyTorch + peft on the untouched base and the run's adapter folder: the same predictions.
  base = transformers.BertForSequenceClassification.from_pretrained(
      minilm_path, num_labels=2, id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1})
  theirs = _predict(peft.PeftModel.from_pretrained(base, workdir / "adapter").eval(), tokenizer,
                    texts)
  np.testing.assert_array_equal(theirs, ours)
  # pipeline() runs the base plus the adapter (from_pretrained's adapter=, through model_kwargs).
  classify = flaxhf.pipeline("text-classification", model=minilm_path, tokenizer=minilm_path,
                             model_kwargs={"adapter": str(workdir / "adapter"), "num_labels": 2},
                             truncation=True, max_length=32)
  labels_out = [int(r["label"].rsplit("_", 1)[-1]) for r in classify(texts[:24])]
  np.testing.assert_array_equal(labels_out, ours[:24])
