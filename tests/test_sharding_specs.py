"""Rule tables -> PartitionSpecs per parameter, placement on the 8 simulated devices, sharded == unsharded."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P

import flaxhf
from flaxhf import sharding
from flaxhf.models.base import flatten
from model_utils import make_inputs

SEQ = "sequence_classification"


def tiny_config(**kw):
  """A tiny BERT whose every dimension divides by the 8 devices, unless `kw` says otherwise."""
  args = dict(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, num_labels=3)
  return transformers.BertConfig(**{**args, **kw})


def mesh_size(mesh, axes):
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in names]))


def expected_specs(model, rules, mesh):
  """The spec each parameter should get: its logical names looked up in the table, one by one.

  A dimension that its mesh axes do not divide stays unsharded.
  """
  table = dict(sharding.RULES[rules])
  shapes = flatten(model.param_shapes())
  out = {}
  for k, logical in flatten(model.logical_axes()).items():
    axes = []
    for name, dim in zip(tuple(logical), shapes[k]):
      mesh_axes = None if name is None else table[name]
      axes.append(mesh_axes if dim % mesh_size(mesh, mesh_axes) == 0 else None)
    used = [a for x in axes if x for a in ((x,) if isinstance(x, str) else x)]
    assert len(used) == len(set(used)), (k, axes)  # a mesh axis shards one dimension at most
    out[k] = P(*axes)
  return out


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)


@pytest.fixture(scope="module")
def model():
  return flaxhf.FlaxBertForSequenceClassification(tiny_config(), _do_init=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("ckpt")
  transformers.BertForSequenceClassification(tiny_config()).save_pretrained(path)
  return str(path)


def test_every_logical_name_in_every_table(model):
  for name, table in sharding.RULES.items():
    logical = [k for k, _ in table]
    assert sorted(logical) == sorted(sharding.LOGICAL_AXES), name
    assert len(logical) == len(set(logical)), name
    for _, axes in table:
      for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
        assert a in sharding.MESH_AXES, (name, a)
  used = {a for spec in flatten(model.logical_axes()).values() for a in spec if a is not None}
  assert used <= set(sharding.LOGICAL_AXES), used - set(sharding.LOGICAL_AXES)
  with pytest.raises(ValueError, match=r"Unknown sharding rules 'tp'.*'fsdp_tp'"):
    sharding.get_rules("tp")


def test_logical_axes_of_bert(model):
  axes = flatten(model.logical_axes())
  layer = "bert.encoder.layer.0."
  assert axes[layer + "attention.self.query.weight"] == P("heads", "embed")
  assert axes[layer + "attention.output.dense.weight"] == P("embed", "heads")
  assert axes[layer + "intermediate.dense.weight"] == P("mlp", "embed")
  assert axes[layer + "output.dense.weight"] == P("embed", "mlp")
  assert axes["bert.embeddings.word_embeddings.weight"] == P("vocab", "embed")
  assert axes["classifier.weight"] == P("classes", "embed")


@pytest.mark.parametrize("rules", ["dp", "fsdp", "fsdp_tp"])
def test_specs_follow_the_table(model, mesh, rules):
  got = flatten(sharding.param_partition_specs(model, rules, mesh))
  want = expected_specs(model, rules, mesh)
  assert set(got) == set(want) == set(flatten(model.param_shapes()))
  for k in want:
    assert got[k] == want[k], (k, got[k], want[k])
  if rules == "dp":
    assert all(all(a is None for a in s) for s in got.values())


def test_concrete_specs(model, mesh):
  layer = "bert.encoder.layer.0."
  tp = flatten(sharding.param_partition_specs(model, "fsdp_tp", mesh))
  assert tp[layer + "attention.self.query.weight"] == P("tensor", "fsdp")
  assert tp[layer + "attention.self.query.bias"] == P("tensor")
  assert tp[layer + "attention.output.dense.weight"] == P("fsdp", "tensor")
  assert tp[layer + "intermediate.dense.weight"] == P("tensor", "fsdp")
  assert tp[layer + "output.dense.weight"] == P("fsdp", "tensor")
  assert tp[layer + "output.LayerNorm.weight"] == P("fsdp")
  assert tp["bert.embeddings.word_embeddings.weight"] == P("tensor", "fsdp")
  assert tp["bert.embeddings.position_embeddings.weight"] == P(None, "fsdp")
  assert tp["classifier.weight"] == P(None, "fsdp")
  fsdp = flatten(sharding.param_partition_specs(model, "fsdp", mesh))
  assert fsdp[layer + "attention.self.query.weight"] == P(None, "fsdp")
  assert fsdp[layer + "output.dense.weight"] == P("fsdp", None)
  assert fsdp["bert.embeddings.word_embeddings.weight"] == P(None, "fsdp")


def test_indivisible_dimension_left_unsharded():
  # vocab 99 and intermediate 66 do not divide by tensor=4; hidden 32 does.
  model = flaxhf.FlaxBertForSequenceClassification(tiny_config(vocab_size=99, intermediate_size=66),
                                                   _do_init=False)
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  got = flatten(sharding.param_partition_specs(model, "fsdp_tp", mesh))
  layer = "bert.encoder.layer.0."
  assert got["bert.embeddings.word_embeddings.weight"] == P(None, "fsdp")
  assert got[layer + "intermediate.dense.weight"] == P(None, "fsdp")
  assert got[layer + "intermediate.dense.bias"] == P(None)
  assert got[layer + "output.dense.weight"] == P("fsdp", None)
  assert got[layer + "attention.self.query.weight"] == P("tensor", "fsdp")  # 32 divides: sharded
  assert got == expected_specs(model, "fsdp_tp", mesh)
  # Without a mesh nothing is known about sizes: the table's spec as it is.
  raw = flatten(sharding.param_partition_specs(model, "fsdp_tp"))
  assert raw["bert.embeddings.word_embeddings.weight"] == P("tensor", "fsdp")


def assert_placed(params, specs, mesh):
  """Every param is on its NamedSharding, each of the 8 devices holding a shard of the right shape."""
  for k, v in flatten(params).items():
    assert isinstance(v.sharding, NamedSharding) and v.sharding.mesh == mesh, k
    assert v.sharding.spec == specs[k], (k, v.sharding.spec, specs[k])
    shard_shape = tuple(d // mesh_size(mesh, a) for d, a in zip(v.shape, tuple(specs[k])))
    assert len(v.addressable_shards) == 8
    assert {s.data.shape for s in v.addressable_shards} == {shard_shape}, k


@pytest.mark.parametrize("rules", ["dp", "fsdp", "fsdp_tp"])
def test_from_pretrained_onto_mesh(checkpoint, mesh, rules):
  ref = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(checkpoint)
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(checkpoint, mesh=mesh,
                                                                        rules=rules)
  assert_placed(model.params, expected_specs(model, rules, mesh), mesh)
  ref_params = flatten(ref.params)
  for k, v in flatten(model.params).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_params[k]), err_msg=k)

  inputs = make_inputs("bert", SEQ, batch=4)
  want = np.asarray(ref(**inputs).logits)
  np.testing.assert_allclose(np.asarray(model(**inputs).logits), want, atol=1e-5, rtol=1e-5)
  # Jitted under the mesh with the rule table active, so activation constraints apply too.
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.get_rules(rules)):
    logits = jax.jit(lambda params, batch: model(**batch, params=params).logits)(
        model.params, {k: jax.device_put(v, batch_sharding) for k, v in inputs.items()})
  np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)


def test_new_head_and_init_placed_on_mesh(tmp_path):
  # A base checkpoint with indivisible dims into a head: the new classifier is placed as well.
  config = tiny_config(vocab_size=99, intermediate_size=66)
  torch.manual_seed(0)
  transformers.BertModel(config).save_pretrained(tmp_path)
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  ref = flaxhf.FlaxBertForSequenceClassification.from_pretrained(str(tmp_path), seed=5)
  model = flaxhf.FlaxBertForSequenceClassification.from_pretrained(str(tmp_path), seed=5, mesh=mesh,
                                                                   rules="fsdp_tp")
  specs = expected_specs(model, "fsdp_tp", mesh)
  assert_placed(model.params, specs, mesh)
  inputs = make_inputs("bert", SEQ, batch=4)
  np.testing.assert_allclose(np.asarray(model(**inputs).logits), np.asarray(ref(**inputs).logits),
                             atol=1e-5, rtol=1e-5)

  # Random init straight into the shardings gives the same numbers as an unsharded init.
  shardings = sharding.param_shardings(model, mesh, "fsdp_tp")
  placed = model.init_weights(jax.random.key(1), shardings)
  assert_placed(placed, specs, mesh)
  plain = flatten(model.init_weights(jax.random.key(1)))
  for k, v in flatten(placed).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(plain[k]), err_msg=k)


def test_make_mesh():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {
      "data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh(data=1, fsdp=-1, tensor=2).shape) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  assert dict(sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()).shape) == {
      "data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="At most one mesh axis may be -1; got data=-1, fsdp=-1") as e:
    sharding.make_mesh(fsdp=-1)
  assert "data defaults to -1" in str(e.value)  # the -1 the caller did not write
  with pytest.raises(ValueError, match=r"data=3 x fsdp=2 x tensor=1 = 6 devices, but 8 are available"):
    sharding.make_mesh(data=3, fsdp=2)
  with pytest.raises(ValueError, match="8 devices cannot be split"):
    sharding.make_mesh(data=-1, fsdp=3)
