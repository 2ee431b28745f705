"""Loading: clear errors (problem + fix) for bad checkpoints and inputs; every weights format; v4 kwargs."""

import json
import os
import shutil
import time

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import flaxhf
from flaxhf.models.base import flatten
from model_utils import TINY_CONFIGS, make_inputs, torch_model, torch_outputs

SEQ = "sequence_classification"


def torch_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
  """A tiny PyTorch BertForSequenceClassification (3 labels) saved by transformers."""
  path = tmp_path_factory.mktemp("clf")
  torch_model("bert", SEQ).save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory):
  """A BertForPreTraining checkpoint (bert.* + cls.predictions.* + cls.seq_relationship.*).

  Every weight is perturbed so that none keeps its 0/1 initial value: a head weight that is
  silently re-initialised instead of loaded would then show.
  """
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(TINY_CONFIGS["bert"]()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("pretraining")
  model.save_pretrained(path)
  return path


def copy_with_config(src, dst, **changes):
  """Copies a model folder, editing config.json fields."""
  shutil.copytree(src, dst)
  with open(dst / "config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(dst / "config.json", "w") as f:
    json.dump(config, f)
  return dst


# ---- errors -------------------------------------------------------------------------------------

def test_unknown_model_type_lists_supported(tmp_path):
  transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=64, vocab_size=99).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type 'gpt_neox'") as e:
    flaxhf.FlaxAutoModel.from_pretrained(str(tmp_path))
  assert "Supported model types" in str(e.value)
  assert all(f"'{t}'" in str(e.value) for t in ("bert", "roberta", "electra"))
  with pytest.raises(ValueError, match="holds a 'gpt_neox' model, not 'bert'.*FlaxAutoModel"):
    flaxhf.FlaxBertModel.from_pretrained(str(tmp_path))

  # A model_type transformers itself does not know: still named, with what flaxhf supports.
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "my_model"}))
  with pytest.raises(ValueError, match="my_model") as e:
    flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path))
  assert "supports model types" in str(e.value) and "'bert'" in str(e.value)


def test_hidden_size_mismatch_blames_the_config(clf_dir, tmp_path):
  path = copy_with_config(clf_dir, tmp_path / "m", hidden_size=64)
  with pytest.raises(ValueError, match="shape mismatches") as e:
    flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(path))
  msg = str(e.value)
  assert "bert.embeddings.word_embeddings.weight (99, 32) vs (99, 64)" in msg
  assert "hidden_size" in msg
  # Re-initialising the whole encoder is no fix for a wrong config, so it is not suggested.
  assert "ignore_mismatched_sizes" not in msg


def test_new_num_labels_needs_ignore_mismatched_sizes(clf_dir, caplog):
  with pytest.raises(ValueError, match=r"classifier\.weight \(3, 32\) vs \(5, 32\)") as e:
    flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(clf_dir), num_labels=5)
  assert "ignore_mismatched_sizes=True" in str(e.value)

  with caplog.at_level("WARNING", logger="flaxhf"):
    model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(
        str(clf_dir), num_labels=5, ignore_mismatched_sizes=True)
  assert "classifier.weight" in caplog.text and "newly initialised" in caplog.text
  assert model.config.num_labels == 5 and len(model.config.id2label) == 5
  params, ckpt = flatten(model.params), load_file(clf_dir / "model.safetensors")
  w = np.asarray(params["classifier.weight"])
  assert w.shape == (5, 32) and abs(w.std() - 0.02) < 0.006
  assert not np.asarray(params["classifier.bias"]).any()
  for k, v in ckpt.items():  # the encoder is the checkpoint's, untouched
    if k.startswith("bert.") and k in params:
      np.testing.assert_array_equal(np.asarray(params[k]), v, err_msg=k)
  assert model(**make_inputs("bert", SEQ)).logits.shape == (2, 5)


def test_missing_files(clf_dir, tmp_path):
  (tmp_path / "no_weights").mkdir()
  shutil.copy(clf_dir / "config.json", tmp_path / "no_weights")
  with pytest.raises(FileNotFoundError, match="No weights in") as e:
    flaxhf.FlaxAutoModel.from_pretrained(str(tmp_path / "no_weights"))
  assert "model.safetensors" in str(e.value) and "from_config" in str(e.value)

  (tmp_path / "no_config").mkdir()
  shutil.copy(clf_dir / "model.safetensors", tmp_path / "no_config")
  for cls in (flaxhf.FlaxAutoModel, flaxhf.FlaxBertModel):
    with pytest.raises(FileNotFoundError, match="No config.json in .*config="):
      cls.from_pretrained(str(tmp_path / "no_config"))

  with pytest.raises(FileNotFoundError, match="not a model folder"):
    flaxhf.FlaxBertModel.from_pretrained(str(tmp_path / "absent"))


def test_mistyped_config_kwarg_suggests_the_field(clf_dir):
  for cls in (flaxhf.FlaxAutoModelForSequenceClassification, flaxhf.FlaxBertForSequenceClassification):
    with pytest.raises(TypeError, match=r"'num_lables' \(did you mean 'num_labels'\?\)"):
      cls.from_pretrained(str(clf_dir), num_lables=3)


def test_offline_hub_fails_fast(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # An empty cache, so the test does not depend on what this machine has downloaded.
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(OSError, match="offline") as e:
    flaxhf.FlaxAutoModel.from_pretrained("bert-base-uncased")
  assert time.perf_counter() - start < 5.0  # no network retries
  assert "'bert-base-uncased'" in str(e.value) and "local folder" in str(e.value)

  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  with pytest.raises(OSError, match="local_files_only"):
    flaxhf.FlaxBertModel.from_pretrained("bert-base-uncased", local_files_only=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(clf_dir, tmp_path, damage):
  path = tmp_path / "m"
  shutil.copytree(clf_dir, path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(
      {"truncated": data[:len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
  with pytest.raises(OSError, match="corrupt or truncated.*Re-download or re-export"):
    flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(path))


def test_trust_remote_code_refused(clf_dir):
  for cls in (flaxhf.FlaxAutoModelForSequenceClassification, flaxhf.FlaxBertForSequenceClassification):
    with pytest.raises(ValueError, match="trust_remote_code=True is not supported.*Drop the argument"):
      cls.from_pretrained(str(clf_dir), trust_remote_code=True)


def test_wrong_input_shapes():
  config = TINY_CONFIGS["bert"](num_labels=3)
  ids = np.full((2, 5), 7)
  # Shapes are checked before the params are touched, so no init is needed.
  mc = flaxhf.FlaxBertForMultipleChoice(config, _do_init=False)
  with pytest.raises(ValueError, match=r"\[batch, choices, length\]; got \(2, 5\)"):
    mc(ids)
  clf = flaxhf.FlaxBertForSequenceClassification(config, _do_init=False)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but input_ids has \(2, 5\)"):
    clf(ids, attention_mask=np.ones((2, 4)))
  with pytest.raises(ValueError, match=r"token_type_ids has shape \(5,\)"):
    clf(ids, token_type_ids=np.zeros(5))
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]; got shape \(2, 3, 5\)"):
    clf(np.full((2, 3, 5), 7))
  with pytest.raises(ValueError, match="needs dropout_rng"):
    clf(ids, train=True)


# ---- formats ------------------------------------------------------------------------------------

def assert_same_logits(model, pt, task=SEQ, atol=1e-5):
  inputs = make_inputs("bert", task)
  np.testing.assert_allclose(np.asarray(model(**inputs).logits), torch_outputs(pt, inputs).logits.numpy(),
                             atol=atol, rtol=1e-5)


def test_sharded_safetensors(tmp_path):
  pt = torch_model("bert", SEQ, seed=1)
  pt.save_pretrained(tmp_path, max_shard_size="20KB")
  shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
  assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
  assert not (tmp_path / "model.safetensors").exists()
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path))
  assert_same_logits(model, pt)

  os.remove(tmp_path / shards[-1])
  with pytest.raises(FileNotFoundError, match=f"names shard {shards[-1]}, which is missing"):
    flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path))


def test_pytorch_model_bin(tmp_path):
  pt = torch_model("bert", SEQ, seed=2)
  pt.config.save_pretrained(tmp_path)
  torch.save(pt.state_dict(), tmp_path / "pytorch_model.bin")
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path))
  assert_same_logits(model, pt)


def test_pretraining_checkpoint_into_classifier(pretraining_dir, caplog):
  with caplog.at_level("INFO", logger="flaxhf"):
    model = flaxhf.FlaxBertForSequenceClassification.from_pretrained(str(pretraining_dir),
                                                                      num_labels=4)
  new = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  unused = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
  assert len(new) == 1 and "classifier.bias, classifier.weight" in new[0]
  assert len(unused) == 1
  for k in ("cls.seq_relationship.weight", "cls.predictions.transform.dense.weight",
            "cls.predictions.bias"):
    assert k in unused[0]
  ckpt = torch_state(transformers.BertForPreTraining.from_pretrained(pretraining_dir))
  params = flatten(model.params)
  encoder = [k for k in params if k.startswith("bert.")]
  assert len(encoder) == len([k for k in ckpt if k.startswith("bert.")])  # pooler included
  for k in encoder:
    np.testing.assert_array_equal(np.asarray(params[k]), ckpt[k], err_msg=k)
  assert params["classifier.weight"].shape == (4, 32)


def test_pretraining_checkpoint_into_masked_lm(pretraining_dir, caplog):
  with caplog.at_level("INFO", logger="flaxhf"):
    model = flaxhf.FlaxBertForMaskedLM.from_pretrained(str(pretraining_dir))
  assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing newly initialised
  assert "bert.pooler.dense.weight" in caplog.text and "cls.seq_relationship.bias" in caplog.text
  pt = transformers.BertForMaskedLM.from_pretrained(pretraining_dir).eval()
  params, want = flatten(model.params), torch_state(pt)
  for k in ("cls.predictions.bias", "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.LayerNorm.weight"):
    np.testing.assert_array_equal(np.asarray(params[k]), want[k], err_msg=k)
  assert_same_logits(model, pt, task="masked_lm")


def test_v4_kwargs_and_do_init_false(clf_dir, pretraining_dir, tmp_path):
  v4 = dict(revision="main", cache_dir=str(tmp_path), token="hf_unused", local_files_only=True,
            from_pt=True, use_auth_token=None)
  model, params = flaxhf.FlaxBertForSequenceClassification.from_pretrained(
      str(clf_dir), seed=3, _do_init=False, **v4)
  with pytest.raises(ValueError, match="_do_init=False.*params="):
    model.params  # noqa: B018
  inputs = make_inputs("bert", SEQ)
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
  np.testing.assert_allclose(np.asarray(model(**inputs, params=params).logits),
                             torch_outputs(pt, inputs).logits.numpy(), atol=1e-5, rtol=1e-5)
  auto = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(clf_dir), **v4)
  assert_same_logits(auto, pt)

  # `seed` decides the new head, and only the new head.
  def head(seed):
    m = flaxhf.FlaxBertForSequenceClassification.from_pretrained(str(pretraining_dir), seed=seed)
    return flatten(m.params)

  a, c = head(3), head(4)
  assert np.abs(np.asarray(a["classifier.weight"]) - np.asarray(c["classifier.weight"])).min() > 0
  np.testing.assert_array_equal(np.asarray(a["bert.pooler.dense.weight"]),
                                np.asarray(c["bert.pooler.dense.weight"]))


def test_random_init_is_seeded_with_transformers_statistics():
  config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=256,
                                   max_position_embeddings=128, initializer_range=0.05,
                                   pad_token_id=3, num_labels=3)
  cls = flaxhf.FlaxBertForSequenceClassification
  p0, p0b, p1 = (flatten(cls(config, seed=s).params) for s in (0, 0, 1))
  for k in p0:
    np.testing.assert_array_equal(np.asarray(p0[k]), np.asarray(p0b[k]), err_msg=k)
  torch.manual_seed(0)
  pt = torch_state(transformers.BertForSequenceClassification(config))
  assert set(p0) == set(pt)
  for k, want in pt.items():
    got = np.asarray(p0[k])
    assert got.shape == want.shape, k
    if want.std() > 0:
      assert np.abs(got - np.asarray(p1[k])).max() > 0.01, k  # another seed, other weights
    if (want == 0).all() or (want == 1).all():  # biases, LayerNorm
      np.testing.assert_array_equal(got, want, err_msg=k)
      continue
    if k == "bert.embeddings.word_embeddings.weight":
      assert not got[3].any() and not want[3].any()  # the padding row
      got, want = np.delete(got, 3, 0), np.delete(want, 3, 0)
    # Normal(0, initializer_range): both stds within sampling error (4 standard errors) of 0.05.
    tol = 4 * 0.05 / np.sqrt(2 * got.size)
    assert abs(got.std() - 0.05) < tol and abs(want.std() - 0.05) < tol, (k, got.std(), want.std())
    assert abs(got.mean()) < 4 * 0.05 / np.sqrt(got.size), k
