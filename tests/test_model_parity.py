"""Every architecture x head: PyTorch -> flaxhf -> PyTorch, outputs equal within 1e-5 (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import flaxhf
from flaxhf.models.base import REGISTRY
from model_utils import (HEADS, TINY_CONFIGS, VARIANTS, main_outputs, make_inputs, torch_model,
                         torch_outputs)

CASES = [(arch, task) for arch in TINY_CONFIGS for task in HEADS]
# Variants change the encoder (and the MLM decoder's tying), so the base model and MLM cover them.
VARIANT_CASES = [(variant, task) for variant in VARIANTS for task in (None, "masked_lm")]
AUTO = {None: flaxhf.FlaxAutoModel,
        "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering,
        "multiple_choice": flaxhf.FlaxAutoModelForMultipleChoice,
        "masked_lm": flaxhf.FlaxAutoModelForMaskedLM}


def assert_close(flax_out, torch_out, task, atol=1e-5):
  got, want = main_outputs(flax_out, task), main_outputs(torch_out, task)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5, err_msg=name)


def check_roundtrip(arch, task, tmp_path, **config_kwargs):
  """PyTorch -> flaxhf (outputs, hidden states, param count) -> save -> PyTorch, no keys left over."""
  pt = torch_model(arch, task, **config_kwargs)
  pt.save_pretrained(tmp_path / "pt")
  inputs = make_inputs(arch, task)
  want = torch_outputs(pt, inputs, output_hidden_states=True)

  model = AUTO[task].from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task][arch]
  got = model(**inputs, output_hidden_states=True)
  assert_close(got, want, task)
  assert len(got.hidden_states) == len(want.hidden_states)
  for g, w in zip(got.hidden_states, want.hidden_states):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5)
  # v4 calling convention: explicit params, tuple indexing, jax inputs.
  again = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=model.params)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())

  model.save_pretrained(tmp_path / "flax")
  back, info = getattr(transformers, HEADS[task]).from_pretrained(
      tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert type(back) is type(pt)
  assert_close(got, torch_outputs(back.eval(), inputs), task)


@pytest.mark.parametrize("arch,task", CASES, ids=[f"{a}-{t or 'base'}" for a, t in CASES])
def test_roundtrip_parity(arch, task, tmp_path):
  check_roundtrip(arch, task, tmp_path)


@pytest.mark.parametrize("variant,task", VARIANT_CASES,
                         ids=[f"{v}-{t or 'base'}" for v, t in VARIANT_CASES])
def test_variant_roundtrip_parity(variant, task, tmp_path):
  arch, config_kwargs = VARIANTS[variant]
  check_roundtrip(arch, task, tmp_path, **config_kwargs)


def test_distilbert_sinusoidal_init_matches_torch():
  pt = torch_model("distilbert", None, sinusoidal_pos_embds=True)
  model = flaxhf.FlaxDistilBertModel(pt.config)
  np.testing.assert_allclose(np.asarray(model.params["embeddings"]["position_embeddings"]["weight"]),
                             pt.embeddings.position_embeddings.weight.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_dropout_and_bf16(arch):
  task = "sequence_classification"
  model = AUTO[task].from_config(TINY_CONFIGS[arch](num_labels=3, hidden_dropout_prob=0.3))
  inputs = make_inputs(arch, task)
  eval1, eval2 = model(**inputs).logits, model(**inputs).logits
  np.testing.assert_array_equal(np.asarray(eval1), np.asarray(eval2))
  drop1 = model(**inputs, train=True, dropout_rng=jax.random.key(1)).logits
  drop2 = model(**inputs, train=True, dropout_rng=jax.random.key(2)).logits
  assert np.abs(np.asarray(drop1) - np.asarray(eval1)).max() > 1e-3
  assert np.abs(np.asarray(drop1) - np.asarray(drop2)).max() > 1e-3

  bf16 = type(model)(model.config, dtype=jnp.bfloat16)
  bf16.params = model.params
  assert jax.tree_util.tree_leaves(bf16.params)[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16(**inputs).logits), np.asarray(eval1), atol=3e-2)


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_base_checkpoint_into_head_creates_new_head(arch, tmp_path, caplog):
  base = torch_model(arch, None)
  base.save_pretrained(tmp_path)
  with caplog.at_level("WARNING", logger="flaxhf"):
    model = AUTO["token_classification"].from_pretrained(str(tmp_path), num_labels=5)
  assert "classifier" in caplog.text
  assert model.config.num_labels == 5
  base_out = AUTO[None].from_pretrained(str(tmp_path))(**make_inputs(arch, None))
  # The encoder weights are the checkpoint's: the base model's hidden states are PyTorch's.
  assert_close(base_out, torch_outputs(base, make_inputs(arch, None)), None)


@pytest.mark.parametrize("problem_type,labels", [
    ("single_label_classification", np.array([0, 2])),
    ("multi_label_classification", np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ("regression", np.array([0.5, -1.25])),
])
def test_sequence_classification_losses_match_torch(problem_type, labels):
  import torch
  num_labels = 1 if problem_type == "regression" else 3
  pt = torch_model("bert", "sequence_classification", problem_type=problem_type,
                   num_labels=num_labels)
  inputs = make_inputs("bert", "sequence_classification")
  want = torch_outputs(pt, inputs, labels=torch.tensor(labels))
  model = flaxhf.FlaxBertForSequenceClassification(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  got = model(**inputs, labels=labels)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)


def test_exported_names_match_their_classes():
  """Every public Flax* name is bound to the class of that name (guards the family unpacking)."""
  names = [n for n in dir(flaxhf) if n.startswith("Flax") and isinstance(getattr(flaxhf, n), type)]
  assert len(names) >= 36
  for n in names:
    assert getattr(flaxhf, n).__name__ == n
