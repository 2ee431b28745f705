"""scan_layers and remat: same numbers as the plain layer loop, same PyTorch keys, clear errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import flaxhf
from engine_utils import read_jsonl, tiny_bert_dir, tiny_config, write_sentiment_tsv
from flaxhf import sharding
from flaxhf.models import io, layers
from flaxhf.models.base import flatten, unflatten
from model_utils import DECODER_CONFIGS, TINY_CONFIGS, make_inputs, torch_model, torch_outputs
from flaxhf.train import engine, optim

# (arch, flaxhf class, task); GPT-2 scales attention by 1/layer so the scanned, traced index counts.
CASES = {
    "bert": (flaxhf.FlaxBertForMaskedLM, "masked_lm", {}),
    "gpt2": (flaxhf.FlaxGPT2LMHeadModel, "causal_lm", dict(scale_attn_by_inverse_layer_idx=True)),
    "distilbert": (flaxhf.FlaxDistilBertForSequenceClassification, "sequence_classification", {}),
}


def variant(plain, **stack):
  """A model with `stack` options (scan_layers=, remat=) holding `plain`'s weights."""
  other = type(plain)(plain.config, _do_init=False, **stack)
  other.params = other._params_from_state_dict(plain.state_dict())
  return other


def loss_fn(model, inputs):
  """sum(logits * fixed noise): a loss that reads every logit; returns the outputs as aux."""
  def loss(params):
    out = model(**inputs, params=params, output_hidden_states=True, output_attentions=True)
    w = jax.random.normal(jax.random.key(0), out.logits.shape)
    return jnp.sum(out.logits * w), out
  return loss


def logits_and_grads(model, inputs):
  """Outputs and PyTorch-keyed gradients, from one compiled program (eager grads are slow)."""
  (_, out), grads = jax.jit(jax.value_and_grad(loss_fn(model, inputs), has_aux=True))(model.params)
  return out, model._unstack({k: np.asarray(v) for k, v in flatten(grads).items()})


def random_model(arch):
  """The plain model with random numpy weights (LayerNorms too), without compiling an init."""
  cls, task, kw = CASES[arch]
  model = cls({**TINY_CONFIGS, **DECODER_CONFIGS}[arch](**kw), _do_init=False)
  rng = np.random.RandomState(1)
  flat = {k: jnp.asarray(rng.normal(0, 0.2, s), jnp.float32)
          for k, s in flatten(model.param_shapes()).items()}
  model.params = unflatten(flat, model.param_shapes())
  return model


@functools.lru_cache(maxsize=None)
def reference(arch):
  """(plain model, inputs, its outputs and gradients): computed once, compared by every test."""
  plain = random_model(arch)
  inputs = make_inputs(arch, CASES[arch][1])
  return plain, inputs, logits_and_grads(plain, inputs)


def has_checkpoint(model, inputs):
  """Whether the backward pass holds a checkpoint (remat) region."""
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(model, inputs)(p)[0]))(model.params))
  return "remat" in jaxpr or "checkpoint" in jaxpr


def assert_same(a, b):
  out_a, grads_a = a
  out_b, grads_b = b
  np.testing.assert_allclose(out_b.logits, out_a.logits, atol=1e-5, rtol=1e-5)
  for name in ("hidden_states", "attentions"):
    got, want = getattr(out_b, name), getattr(out_a, name)
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  assert set(grads_b) == set(grads_a)
  for k in grads_a:
    np.testing.assert_allclose(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_scan_matches_loop(arch):
  plain, inputs, want = reference(arch)
  scanned = variant(plain, scan_layers=True)
  stacked = flatten(scanned.params)
  layer_key = {"bert": "bert.encoder.layer.attention.self.query.weight",
               "gpt2": "transformer.h.attn.c_attn.weight"}[arch]
  assert stacked[layer_key].shape[0] == 2  # one array per weight, layers on the leading axis
  assert flatten(scanned.logical_axes())[layer_key][0] == "layers"
  state, plain_state = scanned.state_dict(), plain.state_dict()
  assert sorted(state) == sorted(plain_state)  # the PyTorch keys, unstacked
  for k in plain_state:
    np.testing.assert_array_equal(state[k], plain_state[k], err_msg=k)
  assert scanned.num_parameters() == plain.num_parameters()
  assert_same(want, logits_and_grads(scanned, inputs))
  with pytest.raises(ValueError, match="scan_layers=False.*need a model built with scan_layers"):
    plain.state_dict(scanned.params)  # stacked params into an unscanned model
  # Weight decay goes by name, so stacked weights decay exactly where their layers' weights do.
  def decays(model):
    shapes = flatten(model.param_shapes())
    mask = flatten(optim.decay_mask({k: np.zeros(()) for k in shapes}))  # the mask reads names
    return model._unstack({k: np.full(shapes[k][:1], mask[k]) if k in model._stacked else mask[k]
                           for k in shapes})
  assert {k: bool(np.all(v)) for k, v in decays(scanned).items()} == decays(plain)


def test_distilbert_scan_matches_loop():
  """The third family on layer_stack: same keys, logits, hidden states and attentions (no grads)."""
  plain = random_model("distilbert")
  scanned = variant(plain, scan_layers=True)
  assert sorted(scanned.state_dict()) == sorted(plain.state_dict())
  inputs = make_inputs("distilbert", CASES["distilbert"][1])
  outs = [jax.jit(lambda p, m=m: m(**inputs, params=p, output_hidden_states=True,
                                   output_attentions=True))(m.params) for m in (plain, scanned)]
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_scan_loads_and_exports_pytorch_checkpoints(arch, tmp_path):
  cls, task, kw = CASES[arch]
  pt = torch_model(arch, task, **kw)
  pt.save_pretrained(tmp_path / "pt")
  inputs = make_inputs(arch, task)
  if arch == "gpt2":  # unpadded: torch's default positions on padded rows are not GPT-2's rule
    inputs["attention_mask"][:] = 1
  want = torch_outputs(pt, inputs).logits.numpy()
  model = cls.from_pretrained(tmp_path / "pt", scan_layers=True)
  got = jax.jit(lambda p: model(**inputs, params=p).logits)(model.params)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  model.save_pretrained(tmp_path / "flax")
  back, info = type(pt).from_pretrained(tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  np.testing.assert_allclose(torch_outputs(back.eval(), inputs).logits.numpy(), want, atol=1e-5,
                             rtol=1e-5)
  # Strict loading still names the PyTorch keys.
  state = model.state_dict()
  missing = "bert.encoder.layer.1.output.dense.bias" if arch == "bert" else "transformer.h.1.ln_2.bias"
  del state[missing]
  with pytest.raises(ValueError, match=f"missing weights: {missing.replace('.', '[.]')}"):
    model._params_from_state_dict(state)
  # Every rule table places the stacked weights, the layer axis unsplit.
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  for rules in sharding.RULES:
    spec = flatten(sharding.param_partition_specs(model, rules, mesh))
    assert all(s[0] is None for k, s in spec.items() if k in model._stacked), rules
  key = "bert.encoder.layer.intermediate.dense.weight" if arch == "bert" else "transformer.h.mlp.c_fc.weight"
  want_spec = (None, "tensor", "fsdp") if arch == "bert" else (None, "fsdp", "tensor")
  assert tuple(spec[key]) == want_spec
  # Loading straight onto the shards stacks the same tensors.
  sharded = cls.from_pretrained(tmp_path / "pt", scan_layers=True, mesh=mesh, rules="fsdp_tp")
  assert tuple(flatten(sharded.params)[key].sharding.spec) == want_spec
  again = sharded.state_dict()
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)


@pytest.mark.parametrize("arch,stack", [
    ("bert", dict(remat="nothing_saveable")),
    ("gpt2", dict(remat="dots_with_no_batch_dims_saveable", scan_layers=True)),
], ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_remat_same_gradients(arch, stack):
  plain, inputs, want = reference(arch)
  rematted = variant(plain, **stack)
  assert_same(want, logits_and_grads(rematted, inputs))
  assert has_checkpoint(rematted, inputs)  # not vacuous


def test_enable_gradient_checkpointing_v4_api():
  plain, inputs, _ = reference("bert")
  model = variant(plain)
  assert not has_checkpoint(model, inputs)
  model.enable_gradient_checkpointing()  # the nothing_saveable case above, switched on later
  assert model.remat == "nothing_saveable" and has_checkpoint(model, inputs)
  assert flatten(model.params).keys() == flatten(plain.params).keys()
  assert flaxhf.FlaxBertModel(plain.config, gradient_checkpointing=True,
                              _do_init=False).remat == "nothing_saveable"


def test_bad_settings_fail_clearly():
  config = TINY_CONFIGS["bert"]()
  with pytest.raises(ValueError, match="Unknown remat policy 'dots'.*nothing_saveable"):
    flaxhf.FlaxBertModel(config, remat="dots", _do_init=False)
  with pytest.raises(ValueError, match="FlaxAlbertModel .*'albert'.* does not support scan_layers"
                                       ".*reuses one set of layer weights"):
    flaxhf.FlaxAlbertModel(TINY_CONFIGS["albert"](), scan_layers=True, _do_init=False)
  t5 = transformers.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2)
  with pytest.raises(ValueError, match="FlaxT5ForConditionalGeneration .*'t5'.*relative attention "
                                       "bias.*supported: .*'gpt2'"):
    flaxhf.FlaxAutoModelForSeq2SeqLM.from_config(t5, remat="nothing_saveable", _do_init=False)
  assert layers.remat_policy("full") is None  # jax.checkpoint's own default: save nothing
  gpt2 = flaxhf.FlaxGPT2LMHeadModel(DECODER_CONFIGS["gpt2"](), scan_layers=True, _do_init=False)
  with pytest.raises(NotImplementedError, match="scan_layers=True.*KV cache.*generate\\(\\) works"):
    gpt2.init_cache(1, 8)


def test_scanned_gpt2_generates_as_the_plain_one():
  plain, _, _ = reference("gpt2")
  scanned = variant(plain, scan_layers=True)
  prompt = np.array([[5, 17, 42, 8]], np.int32)
  got = np.asarray(scanned.generate(prompt, max_new_tokens=3, do_sample=False).sequences)
  assert got.shape == (1, 7)
  # Greedy: each new token is the plain model's argmax after the tokens before it.
  logits = jax.jit(lambda p: plain(got[:, :-1], params=p).logits)(plain.params)
  np.testing.assert_array_equal(np.argmax(logits[0, 3:], -1), got[0, 4:])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("scan_engine")
  return dict(model=tiny_bert_dir(root / "model", minilm_path, layers=3),
              train=write_sentiment_tsv(root / "train.tsv", 64, seed=0))


def run_trainer(setup, workdir, **overrides):
  # One bucket and no evaluation: one compile per run.
  cfg = tiny_config(setup["model"], setup["train"], None, **{
      "train.steps": 3, "mesh.data": 1, "data.buckets": (), "data.max_length": 32,
      "checkpoint.every_steps": 3, "checkpoint.export_best": False, **overrides})
  trainer = engine.Trainer(cfg, str(workdir), jax.devices()[:1])
  try:
    trainer.fit()
  finally:
    trainer.ckpt.close()
  losses = [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  return trainer, np.array(losses)


SCAN_REMAT = {"model.scan_layers": True, "train.remat": "nothing_saveable"}


def test_trainer_trains_scanned_and_rematted(setup, tmp_path):
  trainer, losses = run_trainer(setup, tmp_path, **SCAN_REMAT)
  assert trainer.model.scan_layers and trainer.model.remat == "nothing_saveable"
  params = flatten(trainer.state["params"])
  assert params["bert.encoder.layer.output.dense.weight"].shape[0] == 3
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  got = trainer.model.state_dict(trainer.state["params"])
  cls = type(trainer.model)
  start = io.load_state_dict(setup["model"])  # the base model it started from
  assert not np.allclose(got["bert.encoder.layer.2.output.dense.weight"],
                         start["encoder.layer.2.output.dense.weight"])  # it trained
  # The run's export, and an export of its (stacked) checkpoint, are PyTorch-keyed folders.
  for folder in (tmp_path / "export", engine.export_checkpoint(
      str(tmp_path / "checkpoints" / "3"), str(tmp_path / "from_ckpt"))):
    exported = cls.from_pretrained(folder).state_dict()
    assert sorted(exported) == sorted(got)
    for k in got:
      np.testing.assert_array_equal(exported[k], got[k], err_msg=k)


@pytest.mark.slow
def test_trainer_with_scan_and_remat_matches_plain_run(setup, tmp_path):
  scan, want = run_trainer(setup, tmp_path / "scan", **SCAN_REMAT)
  plain, got = run_trainer(setup, tmp_path / "plain")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  a = scan.model.state_dict(scan.state["params"])
  b = plain.model.state_dict(plain.state["params"])
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)


def test_trainer_bad_remat_name(setup, tmp_path):
  cfg = tiny_config(setup["model"], setup["train"], None, **{"train.remat": "dots"})
  with pytest.raises(ValueError, match="Unknown remat policy 'dots'; choose one of .*'none'"):
    engine.Trainer(cfg, str(tmp_path), jax.devices()[:1])
