"""Logical axis names and the rule tables that map them onto the mesh axes `data, fsdp, tensor`.

Model code names logical axes only; these tables decide placement. Every logical name appears in
every table (a test checks it).
"""

import logging
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# "layers" is the leading axis of weights stacked by scan_layers: never split (each step reads one).
LOGICAL_AXES = ("batch", "seq", "vocab", "embed", "heads", "kv", "mlp", "classes", "layers")

_BATCH = ("data", "fsdp")

RULES: Dict[str, Tuple[Tuple[str, object], ...]] = {
    # Pure data parallelism: weights replicated, batch split over every device.
    "dp": (("batch", _BATCH), ("seq", None), ("vocab", None), ("embed", None), ("heads", None),
           ("kv", None), ("mlp", None), ("classes", None), ("layers", None)),
    # ZeRO-3 style: every weight split along its model dimension over `fsdp`.
    "fsdp": (("batch", _BATCH), ("seq", None), ("vocab", None), ("embed", "fsdp"),
             ("heads", None), ("kv", None), ("mlp", None), ("classes", None), ("layers", None)),
    # FSDP plus Megatron tensor parallelism: attention heads, MLP and vocabulary over `tensor`.
    "fsdp_tp": (("batch", _BATCH), ("seq", None), ("vocab", "tensor"), ("embed", "fsdp"),
                ("heads", "tensor"), ("kv", None), ("mlp", "tensor"), ("classes", None),
                ("layers", None)),
}

log = logging.getLogger(__name__)


def get_rules(name: str):
  if name not in RULES:
    raise ValueError(f"Unknown sharding rules {name!r}; choose one of {sorted(RULES)}.")
  return RULES[name]


def logical_axes(model) -> dict:
  """The logical axis names of every parameter of a flaxhf model, as a pytree of PartitionSpecs."""
  return model.logical_axes()


def _fit_to_shape(spec: P, shape, mesh: Mesh, path: str) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a vocab of 30522 over 4 devices)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if size > 1 and dim % size:
      log.info("%s: dimension %d not divisible by mesh axes %s (%d); left unsharded", path, dim,
               names, size)
      axes = None
    fitted.append(axes)
  return P(*fitted)


def param_partition_specs(model, rules: str | Sequence = "fsdp", mesh: Mesh | None = None) -> dict:
  """Maps a model's params to mesh `PartitionSpec`s under a named rule table (`dp`, `fsdp`, `fsdp_tp`).

  With a mesh, axes that do not divide a dimension are dropped so every spec is valid for it.
  """
  table = get_rules(rules) if isinstance(rules, str) else rules
  logical = model.logical_axes()
  specs = nn.logical_to_mesh(logical, table)
  if mesh is None:
    return specs
  shapes = model.param_shapes()
  flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  flat_shapes = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  fitted = [_fit_to_shape(s, shp, mesh, jax.tree_util.keystr(p))
            for (p, s), shp in zip(flat_specs, flat_shapes)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)), fitted)


def param_shardings(model, mesh: Mesh, rules="fsdp") -> dict:
  """`NamedSharding` per parameter, for placing or loading params straight onto their shards."""
  specs = param_partition_specs(model, rules, mesh)
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A `data x fsdp x tensor` mesh; one size may be -1 to take the devices left over."""
  devices = jax.devices() if devices is None else devices
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1; got data={data}, fsdp={fsdp}, tensor={tensor} "
                     f"(data defaults to -1: pass data=1 to give the rest of the devices to another axis).")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes of {known}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"Mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
                     f"devices, but {len(devices)} are available. Use -1 for one axis to take the rest.")
  device_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices) \
      if len(devices) == len(jax.devices()) else np.asarray(devices).reshape(sizes)
  return Mesh(device_array, MESH_AXES)

