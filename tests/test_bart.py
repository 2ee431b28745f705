"""BART, mBART and Marian: what only this family does. The checks every generative family shares
(round trips both ways, random-init export, labels, the cache, generate, shift_tokens_right, input
errors) run on its rows of tests/test_generative.py, whose tiny configs these tests use."""

import jax
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models.base import flatten, unflatten
from model_utils import torch_outputs
from test_generative import FAMILIES, make_inputs, torch_twin, twin


def test_marian_frozen_tables_get_no_gradient():
  """final_logits_bias (a buffer) and Marian's fixed sinusoidal tables get no gradient, as in
  transformers; a trained weight does."""
  pt = torch_twin("marian", "seq2seq_lm")
  model = twin(pt, "seq2seq_lm")
  inputs = make_inputs("marian", pt.config, None)
  labels = inputs.pop("decoder_input_ids")
  labels[:, -1] = pt.config.eos_token_id
  labels[1, -2:] = -100
  inputs.pop("decoder_attention_mask")
  flat = flatten(model.params)
  keys = ["final_logits_bias", "model.encoder.embed_positions.weight",
          "model.decoder.layers.1.final_layer_norm.weight"]  # the last: a trained control

  def loss(sub):
    return model(**inputs, labels=labels, params=unflatten({**flat, **sub}, model.params)).loss
  grads = jax.grad(loss)({k: flat[k] for k in keys})
  assert not np.any(grads[keys[0]]) and not np.any(grads[keys[1]]) and np.any(grads[keys[2]])


def test_sequence_classification_reads_the_last_eos():
  pt = torch_twin("bart", "sequence_classification")
  model = twin(pt, "sequence_classification")
  ids = np.array([[5, 2, 7, 8, 2, 1], [9, 2, 4, 2, 1, 1]])  # two EOS per row, the last at 4 and 3
  inputs = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
  labels = np.array([0, 2])
  got, want = model(**inputs, labels=labels), torch_outputs(pt, inputs, labels=torch.tensor(labels))
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  ragged = ids.copy()
  ragged[0, 1] = 6  # one EOS in row 0, two in row 1
  with pytest.raises(ValueError, match="same number of <eos> tokens"):
    torch_outputs(pt, {"input_ids": ragged})
  with pytest.raises(ValueError, match=r"same number of <eos> tokens.*\[1, 2\]"):
    model(ragged)
  with pytest.raises(ValueError, match="at least one <eos> token"):
    model(np.array([[5, 6, 7]]))


def test_input_errors():
  """This family's own: Marian derives no decoder inputs, learned positions bound the cache; and
  train=True applies dropout (BART's config has dropout 0.1)."""
  model = twin(torch_twin("bart", "seq2seq_lm", seed=1, init_std=0.1), "seq2seq_lm")
  marian = flaxhf.FlaxMarianModel(FAMILIES["marian"].config(), _do_init=False)
  ids = np.array([[5, 6, 2]])
  with pytest.raises(ValueError, match="needs decoder_input_ids"):
    marian(ids)
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    model.init_cache(1, 65)
  trained = model(ids, train=True, dropout_rng=jax.random.key(0)).logits
  assert np.abs(np.asarray(trained) - np.asarray(model(ids).logits)).max() > 1e-3


def test_v4_mappings():
  from flaxhf import FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING as SEQ2SEQ
  assert SEQ2SEQ[transformers.BartConfig] is flaxhf.FlaxBartForConditionalGeneration
  assert SEQ2SEQ[transformers.MBartConfig] is flaxhf.FlaxMBartForConditionalGeneration
  assert SEQ2SEQ[transformers.MarianConfig] is flaxhf.FlaxMarianMTModel
  assert flaxhf.FLAX_MODEL_MAPPING[transformers.MarianConfig] is flaxhf.FlaxMarianModel
  with pytest.raises(ValueError, match="no ForSequenceClassification model for model_type 'marian'"):
    flaxhf.FlaxAutoModelForSequenceClassification.from_config(FAMILIES["marian"].config())
