"""Building blocks shared by every model family.

Parameters are named and laid out like their PyTorch counterparts (`weight` is `[out, in]` for a
linear layer), so a flattened parameter tree *is* a Hugging Face state dict. Every parameter carries
logical axis names from `flaxhf.sharding.LOGICAL_AXES`.
"""

import dataclasses
import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxhf import xla_cpu

Dtype = jnp.dtype


def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# Same names and formulas as transformers.activations.ACT2FN.
ACT2FN = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str):
  """Returns the activation function transformers knows as `name`."""
  if name not in ACT2FN:
    raise ValueError(f"Unsupported activation {name!r}; flaxhf supports {sorted(ACT2FN)}.")
  return ACT2FN[name]


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def _dense_dims(ndim, w_in_axis):
  return (((ndim - 1,), (w_in_axis,)), ((), ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_f32_accumulate(x, w, w_in_axis):
  return jax.lax.dot_general(x, w, _dense_dims(x.ndim, w_in_axis),
                             preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_f32_accumulate_fwd(x, w, w_in_axis):
  return _dense_f32_accumulate(x, w, w_in_axis), (x, w)


def _dense_f32_accumulate_bwd(w_in_axis, res, g):
  # Both gradient matmuls read 16-bit operands and accumulate in float32 too (JAX's own transpose
  # would meet the float32 cotangent of the accumulator with a 16-bit operand: a float32 matmul).
  x, w = res
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, _dense_dims(g.ndim, 1 - w_in_axis),
                           preferred_element_type=jnp.float32).astype(x.dtype)
  # The weight gradient is computed in w's own layout: a transposed result would make XLA:CPU
  # run the dot on its Eigen path, which has no bf16 x bf16 -> f32 kernel (an error at run time).
  lead = tuple(range(x.ndim - 1))
  a, b = (g, x) if w_in_axis == 1 else (x, g)
  dw = jax.lax.dot_general(a, b, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


_dense_f32_accumulate.defvjp(_dense_f32_accumulate_fwd, _dense_f32_accumulate_bwd)


def dense(x, w, dtype, w_in_axis: int = 1):
  """x [..., I] times a weight w, [O, I] (w_in_axis=1, torch.nn.Linear's layout) or [I, O]
  (w_in_axis=0, GPT-2's Conv1D), computed in `dtype`.

  In float32 this is the plain einsum. In a 16-bit dtype on a CPU with bf16 matrix instructions
  (flaxhf.xla_cpu.f32_accumulating_dots), the products are written as 16-bit inputs accumulated in
  float32, forward and backward, as PyTorch's autocast runs them: XLA:CPU then sends them to its
  bf16 kernels, where a plain bf16 dot is converted to float32 first (1.6x slower on a Zen 4).
  """
  x, w = x.astype(dtype), w.astype(dtype)
  if jnp.dtype(dtype).itemsize == 2 and xla_cpu.f32_accumulating_dots():
    return _dense_f32_accumulate(x, w, w_in_axis)
  return jnp.einsum("...i,oi->...o" if w_in_axis == 1 else "...i,io->...o", x, w)


class Linear(nn.Module):
  """`torch.nn.Linear`: y = x W^T + b with W stored as [out, in]."""

  features: int
  axes: tuple  # logical names of (out, in)
  std: float = 0.02
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w_OxI = self.param(
        "weight", nn.with_logical_partitioning(normal_init(self.std), self.axes),
        (self.features, x.shape[-1]), jnp.float32)
    y = dense(x, w_OxI, self.dtype)
    if self.use_bias:
      b_O = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[:1]),
          (self.features,), jnp.float32)
      y = y + b_O.astype(self.dtype)
    return y


class Conv1D(nn.Module):
  """transformers' GPT-2 `Conv1D`: y = x W + b with W stored as [in, out] (a transposed Linear)."""

  features: int
  axes: tuple  # logical names of (in, out)
  std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w_IxO = self.param(
        "weight", nn.with_logical_partitioning(normal_init(self.std), self.axes),
        (x.shape[-1], self.features), jnp.float32)
    b_O = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                     (self.features,), jnp.float32)
    return dense(x, w_IxO, self.dtype, w_in_axis=0) + b_O.astype(self.dtype)


class LayerNorm(nn.Module):
  """`torch.nn.LayerNorm` (`weight`, `bias`); statistics in float32 whatever the compute dtype."""

  eps: float = 1e-12
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (d,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's and Llama's RMS norm: a scale only, no mean subtraction or bias; statistics in float32.

  With `unit_offset` (Gemma) the scale is 1 + weight, and weight starts at zero.
  """

  eps: float = 1e-6
  init_scale: float = 1.0  # T5 initialises it to initializer_factor
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = 0.0 if self.unit_offset else self.init_scale
    weight = self.param("weight", nn.with_logical_partitioning(
        nn.initializers.constant(init), (self.axis_name,)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = 1.0 + weight if self.unit_offset else weight
    return (scale * (x32 * jax.lax.rsqrt(variance + self.eps))).astype(self.dtype)


class Embedding(nn.Module):
  """`torch.nn.Embedding` (`weight` [num, dim]) with its `padding_idx` rule: the padding row starts
  at zero and never gets a gradient from lookups (a QA loss over padded positions would train it)."""

  num_embeddings: int
  features: int
  axes: tuple = ("vocab", "embed")
  std: float = 0.02
  padding_idx: Optional[int] = None
  embedding_init: Optional[Callable] = None  # replaces the normal init (DistilBERT's sinusoidal table)
  dtype: Dtype = jnp.float32

  def setup(self):
    def init(key, shape, dtype):
      w = (self.embedding_init or normal_init(self.std))(key, shape, dtype)
      if self.padding_idx is not None and 0 <= self.padding_idx < shape[0]:
        w = w.at[self.padding_idx].set(0.0)
      return w

    self.weight = self.param("weight", nn.with_logical_partitioning(init, self.axes),
                             (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids):
    x = jnp.take(self.weight, ids, axis=0)
    if self.padding_idx is not None:
      x = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
    return x.astype(self.dtype)

  def attend(self, x):
    """Projects onto the vocabulary with the (tied) embedding matrix."""
    return dense(x, self.weight, self.dtype)


def attention_bias(attention_mask, dtype):
  """Additive bias: 0 where attended, the dtype's minimum where masked (as transformers).

  A padding mask [B, S] gives [B, 1, 1, S]; a per-query mask [B, L, S] (decoders) gives [B, 1, L, S].
  """
  mask = attention_mask.astype(bool)
  mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]
  return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


# ---- dropout ---------------------------------------------------------------------------------------
_KEEP_BITS = 16  # random bits per dropout decision: two decisions from each 32-bit draw


def dropout_keep(rng, rate: float, shape) -> tuple:
  """(keep mask of `shape`, the scale for kept values) of dropout at `rate`.

  Each decision reads 16 random bits: two decisions share one 32-bit draw, half the random bits
  (and half the hashing) of jax.random.bernoulli's one uniform float per element, which profiles
  showed as ~10% of a BERT-size train step on CPU. The keep probability is rounded to 1/65536
  (0.1 gives 0.099991) and the scale is its exact inverse, so the expectation is kept exactly.
  """
  threshold = int(round((1.0 - rate) * (1 << _KEEP_BITS)))
  shape = tuple(shape)
  lead, last = shape[:-1], (shape[-1] if shape else 1)
  pairs = (last + 1) // 2
  bits = jax.random.bits(rng, lead + (pairs,), jnp.uint32)
  halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(lead + (2 * pairs,))
  if 2 * pairs != last:
    halves = halves[..., :last]
  keep = halves.reshape(shape) < jnp.uint32(threshold)
  return keep, (1 << _KEEP_BITS) / threshold


def dropout(x, rate: float, rng):
  """x with each element zeroed at `rate` and the rest scaled to keep the expectation."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep, scale = dropout_keep(rng, rate, x.shape)
  return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
  """flax.linen.Dropout's interface (rate; deterministic at construction or call) over
  `dropout_keep`'s cheaper mask."""

  rate: float
  deterministic: Optional[bool] = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, inputs, deterministic: Optional[bool] = None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return inputs
    return dropout(inputs, self.rate, self.make_rng(self.rng_collection) if rng is None else rng)


def dot_product_attention(q_BxLxHxD, k_BxSxKxD, v_BxSxKxD, bias, *, dropout_rate: float,
                          deterministic: bool, module: nn.Module, dtype, scale: Optional[float] = None,
                          softcap: Optional[float] = None, zero_unseen: bool = True):
  """Scaled dot-product attention; softmax in float32; returns (context [B,L,H,D], probs [B,H,L,S]).

  Keys and values may have fewer heads K than the queries (grouped-query attention): query head h
  reads KV head h // (H / K), as transformers' repeat_kv lays them out. `scale` defaults to
  1/sqrt(head_dim); GPT-2's config can turn it off or divide it by the layer index. `softcap` c
  bounds the scaled logits to c * tanh(logits / c) before the mask (Gemma 2). A query that sees no
  key gets zero context (torch's SDPA), or with `zero_unseen=False` the mean of every value, as
  transformers' eager attention gives it (Gemma 2, which has no SDPA path).
  """
  scale = 1.0 / math.sqrt(q_BxLxHxD.shape[-1]) if scale is None else scale
  b, l, h, d = q_BxLxHxD.shape
  k_heads, s = k_BxSxKxD.shape[2], k_BxSxKxD.shape[1]
  if k_heads == h:
    logits_BxHxLxS = jnp.einsum("blhd,bshd->bhls", q_BxLxHxD, k_BxSxKxD)
  else:  # the queries of each KV head as one group: no copy of the keys per query head
    q_BxLxKxGxD = q_BxLxHxD.reshape(b, l, k_heads, h // k_heads, d)
    logits_BxHxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxD, k_BxSxKxD).reshape(b, h, l, s)
  logits_BxHxLxS = logits_BxHxLxS.astype(jnp.float32) * scale
  if softcap is not None:
    logits_BxHxLxS = jnp.tanh(logits_BxHxLxS / softcap) * softcap
  if bias is not None:
    bias32 = bias.astype(jnp.float32)
    logits_BxHxLxS = logits_BxHxLxS + bias32
    probs = jax.nn.softmax(logits_BxHxLxS, axis=-1)
    if zero_unseen:
      # A query that may see no key at all (a left-padded slot under the causal mask) gets zero
      # context, as torch's scaled_dot_product_attention (transformers' default) gives it.
      sees_a_key = jnp.max(bias32, axis=-1, keepdims=True) > 0.5 * jnp.finfo(bias.dtype).min
      probs = jnp.where(sees_a_key, probs, 0.0)
  else:
    probs = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  if not deterministic and dropout_rate > 0.0:
    probs = dropout(probs, dropout_rate, module.make_rng("dropout"))
  probs = probs.astype(dtype)
  if k_heads == h:
    context_BxLxHxD = jnp.einsum("bhls,bshd->blhd", probs, v_BxSxKxD)
  else:
    probs_BxKxGxLxS = probs.reshape(b, k_heads, h // k_heads, l, s)
    context_BxLxHxD = jnp.einsum("bkgls,bskd->blkgd", probs_BxKxGxLxS, v_BxSxKxD).reshape(b, l, h, d)
  return context_BxLxHxD, probs


def split_heads(x_BxLxE, num_heads):
  b, l, e = x_BxLxE.shape
  return x_BxLxE.reshape(b, l, num_heads, e // num_heads)


def merge_heads(x_BxLxHxD):
  b, l, h, d = x_BxLxHxD.shape
  return x_BxLxHxD.reshape(b, l, h * d)


def constrain(x, axes):
  """Activation sharding hint by logical axes; a no-op outside a mesh with rules."""
  return nn.with_logical_constraint(x, axes)


class OutputBias(nn.Module):
  """A bare vocabulary bias, stored as `<name>.bias` like transformers' LM heads."""

  size: int

  @nn.compact
  def __call__(self):
    return self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                      (self.size,), jnp.float32)


# ---- the layer stack: a Python loop or one scanned layer, each layer optionally rematerialised ---
# "none" keeps every activation; "full" is jax.checkpoint's default (save nothing, recompute all).
_POLICY_NAMES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                 "everything_saveable", "checkpoint_dots", "checkpoint_dots_with_no_batch_dims")
REMAT_POLICIES = ("none", "full") + tuple(n for n in _POLICY_NAMES if hasattr(jax.checkpoint_policies, n))


def remat_policy(name: str):
  """jax.checkpoint_policies.<name> ("full": None, jax.checkpoint's save-nothing default)."""
  if name not in REMAT_POLICIES or name == "none":
    raise ValueError(f"Unknown remat policy {name!r}; choose one of {list(REMAT_POLICIES)} "
                     "(the named policies of jax.checkpoint_policies; 'none' turns remat off).")
  return None if name == "full" else getattr(jax.checkpoint_policies, name)


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """How a family runs its layers: `scan` (one compiled layer, weights stacked on a leading "layers"
  axis) and `remat` (a jax.checkpoint_policies name, or "none"). A hashable Linen module field."""

  scan: bool = False
  remat: str = "none"

  def __post_init__(self):
    if self.remat != "none":
      remat_policy(self.remat)  # a bad name fails when the model is built, not inside a trace


def fusion_barrier(x):
  """x, written to memory once: XLA cannot fuse the ops that make it into the ops that read it.

  XLA:CPU drops optimization_barrier before fusion, so on CPU this is a while loop whose trip
  count XLA cannot know (0 or 1, from the data) and whose body swaps two copies of x: any trip
  count returns x bit for bit, and a loop's result is a buffer. Elsewhere it is the identity
  (GPU and TPU fusion does not duplicate the chains this guards against).
  """
  if jax.default_backend() != "cpu":
    return x
  trips = (x.reshape(-1)[0] > 0).astype(jnp.int32)
  def swap(c):
    i, a, b = c
    return i + 1, b, a
  return jax.lax.while_loop(lambda c: c[0] < trips, swap, (jnp.int32(0), x, x))[1]


@jax.custom_vjp
def materialize_gradient(x):
  """The identity, whose gradient is materialised (fusion_barrier) instead of recomputed.

  Called on each layer's output. Without it XLA:CPU fuses the backward residual chain (the adds,
  LayerNorm and dropout backward of every later layer) into each consumer of the residual's
  gradient, recomputing the chain once per layer: quadratic in depth, 4 s of GPT-2 small's 20 s
  train step (8 x 256) on 2 cores.
  """
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g_x):
  return (fusion_barrier(g_x),)


materialize_gradient.defvjp(_materialize_fwd, _materialize_bwd)


def layer_stack(make_layer, num_layers: int, name: str, stack: LayerStack, x, *args,
                pass_index: bool = False, collect: bool = False):
  """Runs `x, extra = layer(x, *args)` through `num_layers` layers; returns (x, xs, extras).

  Unscanned, layer i is `make_layer(f"{name}.{i}")`, the PyTorch names. Scanned, one layer named
  `name` runs under nn.scan with every weight stacked on a leading "layers" axis (base.py unstacks
  them into `name.{i}.*` keys on export and stacks them on load). `xs` are the layer outputs (when
  `collect`, for output_hidden_states) and `extras` each layer's second output, as tuples of length
  `num_layers`. With `pass_index` the layer also gets `layer_idx=i` (traced under scan).
  """
  def maybe_remat(fn):
    if stack.remat == "none":
      return fn
    # prevent_cse stops XLA from merging the recomputation back into the forward pass; a scan body
    # is already opaque to that, where the guard would only block optimisations.
    return nn.remat(fn, policy=remat_policy(stack.remat), prevent_cse=not stack.scan)

  def run(layer, x, i):
    return layer(x, *args, **({"layer_idx": i} if pass_index else {}))

  if not stack.scan:
    xs, extras = [], []
    for i in range(num_layers):
      def run_i(layer, x, i=i):  # i stays a Python int (GPT-2's per-layer scale is a constant)
        return run(layer, x, i)
      x, extra = maybe_remat(run_i)(make_layer(f"{name}.{i}"), x)
      x = materialize_gradient(x)
      xs.append(x if collect else None)
      extras.append(extra)
    return x, tuple(xs), tuple(extras)

  def body(layer, x, i):
    y, extra = maybe_remat(run)(layer, x, i)
    return y, (y if collect else None, extra)

  scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True, "dropout": True}, length=num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  x, (ys, extras) = scanned(make_layer(name), x, jnp.arange(num_layers))
  def unstack(tree):
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(num_layers))
  return x, unstack(ys), unstack(extras)
