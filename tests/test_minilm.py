"""The real all-MiniLM-L6-v2 checkpoint: flaxhf equals PyTorch transformers on a real tokenized batch."""

import jax
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf import FlaxAutoModelForSequenceClassification

SENTENCES = ["I've been waiting for this my whole life.", "I hate this so much!",
             "A short one.", "The quick brown fox jumps over the lazy dog, twice, before breakfast."]


@pytest.fixture(scope="module")
def tok(minilm_path):
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


def test_hidden_states_equal_torch(minilm_path, tok):
  inputs = tok(SENTENCES, padding=True, truncation=True, return_tensors="np")
  assert (inputs["attention_mask"] == 0).any()  # the batch really carries padding
  pt = transformers.BertModel.from_pretrained(minilm_path).eval()
  with torch.no_grad():
    want = pt(**{k: torch.tensor(v) for k, v in inputs.items()}, output_hidden_states=True)

  model = flaxhf.FlaxBertModel.from_pretrained(minilm_path)
  got = model(**inputs, output_hidden_states=True)
  assert len(got.hidden_states) == len(want.hidden_states) == 7  # embeddings + 6 layers
  for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"layer {i}")
  np.testing.assert_allclose(np.asarray(got.last_hidden_state), want.last_hidden_state.numpy(),
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(got.pooler_output), want.pooler_output.numpy(),
                             atol=1e-4, rtol=1e-4)
  # Real weights, not a fresh init: the word embeddings are the checkpoint's exactly.
  np.testing.assert_array_equal(np.asarray(model.params["embeddings"]["word_embeddings"]["weight"]),
                                pt.embeddings.word_embeddings.weight.detach().numpy())


def test_tutorial_snippet(minilm_path, tmp_path):
  # The transformers-v4 Flax tutorial, verbatim apart from the path.
  from transformers import AutoTokenizer
  path, out_dir = minilm_path, tmp_path / "clf"
  tok = AutoTokenizer.from_pretrained(path)
  model = FlaxAutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
  inputs = tok(["I've been waiting for this my whole life.", "I hate this so much!"], padding=True,
               truncation=True, return_tensors="np")
  outputs = model(**inputs)
  probs = jax.nn.softmax(outputs.logits, axis=-1)
  id2label = model.config.id2label
  model.save_pretrained(out_dir)

  assert type(model) is flaxhf.FlaxBertForSequenceClassification
  assert probs.shape == (2, 2)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
  assert id2label == {0: "LABEL_0", 1: "LABEL_1"}

  # The PyTorch twin: same checkpoint, its new classifier set to the one flaxhf initialised.
  pt = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
  clf = model.params["classifier"]
  with torch.no_grad():
    pt.classifier.weight.copy_(torch.tensor(np.asarray(clf["weight"])))
    pt.classifier.bias.copy_(torch.tensor(np.asarray(clf["bias"])))
    pt_logits = pt(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
  np.testing.assert_allclose(np.asarray(probs), torch.softmax(pt_logits, -1).numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(outputs.logits), pt_logits.numpy(), atol=1e-4, rtol=1e-4)
  # The classifier starts small and random, like transformers' (std 0.02, zero bias).
  assert 0.01 < float(np.std(clf["weight"])) < 0.03 and not np.asarray(clf["bias"]).any()

  back, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      out_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert type(back) is transformers.BertForSequenceClassification
  assert back.config.id2label == id2label
  with torch.no_grad():
    back_logits = back.eval()(**{k: torch.tensor(v) for k, v in inputs.items()}).logits
  np.testing.assert_allclose(back_logits.numpy(), np.asarray(outputs.logits), atol=1e-4, rtol=1e-4)
