"""Real data, CI-sized: the MiniLM checkpoint fine-tuned on GLUE SST-2 from ../shared/data."""

import json
import os

import jax
import numpy as np
import pytest

from engine_utils import read_jsonl


@pytest.mark.xla_optimized  # 40 MiniLM steps: the steps dominate
def test_minilm_sst2_finetune_and_export(data_dir, minilm_path, tmp_path):
  import torch
  import transformers

  from configs.text_classification import get_config
  from flaxhf import FlaxAutoModelForSequenceClassification
  from flaxhf.data.sources import read_file
  from flaxhf.train import engine
  cfg = get_config("sst2,local")
  cfg.model.name_or_path = minilm_path
  cfg.data.train_file = str(data_dir / "text_classification/glue/SST-2/train.tsv")
  cfg.data.validation_file = str(data_dir / "text_classification/glue/SST-2/dev.tsv")
  cfg.data.max_train_samples = 4000
  cfg.data.max_eval_samples = 256  # dev's first 256 sentences: chance ~0.5 +- 0.03
  cfg.data.max_length = 32  # SST-2 train phrases are short; a few dev sentences are cut
  cfg.train.steps = 40
  cfg.train.batch_size = 32
  cfg.train.learning_rate = 2e-4
  cfg.train.warmup_ratio = 0.1
  cfg.train.eval_every = 0
  cfg.train.log_every = 10
  cfg.train.progress_bar = False
  cfg.checkpoint.every_steps = 1000
  cfg.mesh.data = 1  # 8 simulated devices share 2 cores: one device is faster here
  results = engine.run(cfg, str(tmp_path), devices=jax.devices()[:1])
  # Chance is ~0.51 on SST-2 dev; 40 steps of 32 take MiniLM well past it (measured 0.773; 0.805
  # after 60 steps).
  assert results["accuracy"] > 0.72, results
  losses = [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
  assert losses[-1] < losses[0] - 0.2
  assert json.load(open(tmp_path / "eval_results.json"))["accuracy"] == results["accuracy"]

  # The export, loaded in PyTorch transformers, makes the same dev predictions as flaxhf.
  dev = read_file(cfg.data.validation_file).select(range(256))
  texts, labels = list(dev["sentence"]), np.array(dev["label"], dtype=np.int64)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  flax_model = FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"))
  torch_logits, flax_logits = [], []
  with torch.no_grad():
    for i in range(0, len(texts), 128):
      enc = tok(texts[i:i + 128], padding="max_length", truncation=True, max_length=32,
                return_tensors="np")  # one shape: one flaxhf compile
      torch_logits.append(model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy())
      flax_logits.append(np.asarray(flax_model(**enc).logits))
  torch_logits, flax_logits = np.concatenate(torch_logits), np.concatenate(flax_logits)
  np.testing.assert_allclose(flax_logits, torch_logits, atol=1e-4)
  np.testing.assert_array_equal(flax_logits.argmax(-1), torch_logits.argmax(-1))
  # ... and those are the predictions the engine scored during training.
  assert float((torch_logits.argmax(-1) == labels).mean()) == pytest.approx(results["accuracy"])
  assert os.path.exists(tmp_path / "export" / "tokenizer.json")
