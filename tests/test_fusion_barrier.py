"""layers.fusion_barrier / materialize_gradient: exact identities that keep XLA:CPU's backward linear
in depth (without them it fuses the residual-gradient chain of every later layer into each layer's
weight-gradient ops, recomputing it once per layer)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxhf
from flaxhf.models import layers
from model_utils import DECODER_CONFIGS


@pytest.mark.parametrize("first", [1.5, -1.5, 0.0, np.nan])  # trip count 1, 0, 0, 0
def test_fusion_barrier_is_the_identity_bit_for_bit(first):
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  x[0, 0] = first
  y = np.asarray(jax.jit(layers.fusion_barrier)(jnp.asarray(x)))
  np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))


def test_materialize_gradient_leaves_values_and_gradients_unchanged():
  x = jnp.asarray(np.random.RandomState(1).randn(4, 6).astype(np.float32))
  w = jnp.asarray(np.random.RandomState(2).randn(6, 6).astype(np.float32))

  def f(x, barrier):
    for _ in range(3):
      x = x + jnp.tanh(x @ w)
      x = layers.materialize_gradient(x) if barrier else x
    return jnp.sum(x * x)

  v0, g0 = jax.jit(jax.value_and_grad(lambda x: f(x, False)))(x)
  v1, g1 = jax.jit(jax.value_and_grad(lambda x: f(x, True)))(x)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-6)


def max_fusion_operands(n_layer):
  """The widest fusion (operand count) in GPT-2's compiled gradient, n_layer layers."""
  config = DECODER_CONFIGS["gpt2"](n_layer=n_layer, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
  model = flaxhf.FlaxGPT2LMHeadModel(config, seed=0)
  ids = jnp.ones((2, 16), jnp.int32)

  def loss(params):
    out = model(ids, params=params, train=True, dropout_rng=jax.random.key(0))
    return jnp.sum(out.logits ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(model.params).compile().as_text()
  return max(len(re.findall(r"%[\w.\-]+", m)) for m in re.findall(r"= \S+ fusion\(([^)]*)\)", hlo))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier guards XLA:CPU's fusion")
def test_backward_fusions_do_not_grow_with_depth():
  # Measured with jax 0.10.2: without the barrier the widest fusion reads 87 buffers at 4 layers
  # and 161 at 8 (the chain of every later layer); with it, 21 at both.
  assert max_fusion_operands(8) <= max_fusion_operands(4) + 2
