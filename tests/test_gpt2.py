"""GPT-2: parity with transformers both ways for every head, the KV cache, causality, padding, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models.base import REGISTRY, flatten
from model_utils import (DECODER_CONFIGS, DECODER_HEADS, HEADS, VOCAB, main_outputs, make_inputs,
                         torch_model, torch_outputs)

TASKS = [None, "causal_lm", "sequence_classification", "token_classification", "question_answering"]
AUTO = {None: flaxhf.FlaxAutoModel, "causal_lm": flaxhf.FlaxAutoModelForCausalLM,
        "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering}
# (task, config overrides): every head, plus the untied LM head and the config switches of attention.
CASES = [(t, {}) for t in TASKS] + [
    ("causal_lm", dict(tie_word_embeddings=False)),
    ("causal_lm", dict(n_inner=48, activation_function="relu", layer_norm_epsilon=1e-3,
                       scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)),
    (None, dict(scale_attn_weights=False)),
]
IDS = [f"{t or 'base'}{'-' + '-'.join(kw) if kw else ''}" for t, kw in CASES]


def config(**kw):
  return DECODER_CONFIGS["gpt2"](**kw)


def torch_class(task):
  return getattr(transformers, {**HEADS, **DECODER_HEADS}[task])


def gpt2_inputs(task, **kw):
  """make_inputs' right-padded batch with explicit 0..L-1 positions, as torch numbers every slot."""
  inputs = make_inputs("gpt2", task, **kw)
  b, l = inputs["input_ids"].shape
  inputs["position_ids"] = np.broadcast_to(np.arange(l), (b, l)).copy()
  return inputs


def assert_close(got, want, task, atol=1e-5):
  got, want = main_outputs(got, task), main_outputs(want, task)
  assert set(got) == set(want) and got
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5, err_msg=name)


def export_and_check(model, inputs, task, tmp_path, want=None):
  """save_pretrained -> transformers loads with no key left over, to the same outputs."""
  model.save_pretrained(tmp_path / "flax")
  back, info = torch_class(task).from_pretrained(tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  got = model(**inputs)
  assert_close(got, torch_outputs(back.eval(), inputs), task)
  if want is not None:
    assert type(back) is type(want)
  return back


@pytest.mark.parametrize("task,overrides", CASES, ids=IDS)
def test_roundtrip_parity(task, overrides, tmp_path):
  """PyTorch -> flaxhf (outputs, hidden states, param count) -> save -> PyTorch, no keys left over."""
  pt = torch_model("gpt2", task, **overrides)
  pt.save_pretrained(tmp_path / "pt")
  inputs = gpt2_inputs(task)
  want = torch_outputs(pt, inputs, output_hidden_states=True)

  model = AUTO[task].from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task]["gpt2"]
  got = model(**inputs, output_hidden_states=True)
  assert_close(got, want, task)
  assert len(got.hidden_states) == len(want.hidden_states) == pt.config.n_layer + 1
  for g, w in zip(got.hidden_states, want.hidden_states):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5)
  again = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=model.params,
                return_dict=False)  # v4 convention: explicit params, a tuple
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())
  keys = set(flatten(model.params))
  assert ("lm_head.weight" in keys) == (task == "causal_lm" and not pt.config.tie_word_embeddings)
  back = export_and_check(model, inputs, task, tmp_path, want=pt)
  if task == "causal_lm" and pt.config.tie_word_embeddings:
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("tied", [True, False])
def test_random_init_exports_to_torch(tied, tmp_path):
  """flaxhf's own init (GPT-2's scaled c_proj) -> save -> transformers: same logits."""
  c = config(tie_word_embeddings=tied, n_layer=8, initializer_range=0.05)
  model = flaxhf.FlaxAutoModelForCausalLM.from_config(c, seed=3)
  flat = flatten(model.params)
  # transformers' _init_weights: normal(initializer_range), c_proj over sqrt(2 * n_layer), zero biases.
  np.testing.assert_allclose(np.std(flat["transformer.h.0.attn.c_attn.weight"]), 0.05, rtol=0.1)
  for k in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
    np.testing.assert_allclose(np.std(flat[k]), 0.05 / 4, rtol=0.1)
  assert not np.any(flat["transformer.h.0.mlp.c_fc.bias"])
  np.testing.assert_array_equal(flat["transformer.ln_f.weight"], 1.0)
  export_and_check(model, gpt2_inputs("causal_lm"), "causal_lm", tmp_path)


def test_default_positions_follow_the_mask():
  """Without position_ids: right-padded real tokens get 0..n-1, so they match torch's arange."""
  pt = torch_model("gpt2", "causal_lm")
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = make_inputs("gpt2", "causal_lm")
  real = inputs["attention_mask"].astype(bool)
  got = np.asarray(model(**inputs).logits)[real]
  np.testing.assert_allclose(got, torch_outputs(pt, inputs).logits.numpy()[real], atol=1e-5)
  from flaxhf.models.gpt2 import positions_from_mask
  np.testing.assert_array_equal(positions_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])),
                                [[1, 1, 0, 1, 2], [0, 1, 2, 1, 1]])


def test_causal_lm_loss_matches_torch():
  pt = torch_model("gpt2", "causal_lm")
  inputs = gpt2_inputs("causal_lm")
  labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
  labels[0, 4] = -100
  want = torch_outputs(pt, inputs, labels=torch.tensor(labels)).loss
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  got = model(**inputs, labels=labels)
  np.testing.assert_allclose(float(got.loss), float(want), rtol=1e-5)
  assert float(got.loss) > 1.0  # an untrained model over 99 tokens: about log(99)
