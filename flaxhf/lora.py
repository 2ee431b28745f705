"""LoRA for every family, as a transform of the parameter tree, named and saved the way `peft` does.

A target module `M` (a Linear with `weight` [out, in], or GPT-2's Conv1D with [in, out]) gains
`M.lora_A.weight` [r, in] and `M.lora_B.weight` [out, r] beside its frozen weight (with a leading
"layers" axis under scan_layers). Training runs PEFT's unmerged forward, y = base(x) + s B A
dropout(x), by intercepting those modules' calls (no family code; the frozen W gets no gradient);
inference and export merge W + s B A. `save_adapter` writes a folder `PeftModel.from_pretrained`
loads; `load_adapter` reads one written by `peft`.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxhf.models.layers import Conv1D, Linear, dropout

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN = (
    "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# peft 0.21.2's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the types flaxhf implements
# (a test checks they are equal), so `r` alone targets what `peft.get_peft_model` would.
PEFT_DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "electra": ["query", "value"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
}
# phi3 has no peft default (its attention is one fused qkv_proj): it asks for target_modules.
# Types peft has no default for (it asks for target_modules): the same query/value choice. The
# exported adapter_config.json always lists the targets, so peft loads these too.
FLAXHF_DEFAULT_TARGETS = {"distilbert": ["q_lin", "v_lin"], "albert": ["query", "value"],
                          "mbart": ["q_proj", "v_proj"], "marian": ["q_proj", "v_proj"]}
# flaxhf head task -> peft TaskType (the PeftModel class PeftModel.from_pretrained builds).
PEFT_TASK_TYPES = {None: "FEATURE_EXTRACTION", "text_encoding": "FEATURE_EXTRACTION",
                   "causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM",
                   "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS",
                   "question_answering": "QUESTION_ANS"}
# Heads whose new output layer must train in full: a frozen random classifier cannot learn.
_HEAD_TASKS = ("sequence_classification", "token_classification", "question_answering",
               "multiple_choice")
# adapter_config.json keys whose non-default values change the adapter's math: refused on import.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
                "layer_replication": None}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """PEFT's LoraConfig fields flaxhf implements (same names and defaults)."""

  r: int = 8
  lora_alpha: float = 8
  lora_dropout: float = 0.0
  target_modules: Optional[object] = None   # leaf names (list) or a regex over module paths (str)
  modules_to_save: Optional[tuple] = None   # None: the head's own modules (classifier, score, ...)
  use_rslora: bool = False

  @property
  def scale(self) -> float:
    return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

  @classmethod
  def from_config(cls, c) -> Optional["LoraConfig"]:
    """From a config's `model.lora` block; None when r is 0 (LoRA off)."""
    if not c.r:
      return None
    targets = c.target_modules or None  # "" is unset: a command line cannot give None
    if targets is not None and re.fullmatch(r"[\w.]+(,[\w.]+)*", targets.replace(" ", "")):
      targets = targets.replace(" ", "").split(",")  # names; anything else is a regex, as in peft
    save = None if c.modules_to_save is None else tuple(filter(None, (
        s.strip() for s in c.modules_to_save.split(","))))
    return cls(r=int(c.r), lora_alpha=float(c.lora_alpha), lora_dropout=float(c.lora_dropout),
               target_modules=targets, modules_to_save=save, use_rslora=bool(c.use_rslora))

  @classmethod
  def from_peft(cls, d: dict, source: str = "adapter_config.json") -> "LoraConfig":
    """From a peft adapter_config.json dict; features flaxhf does not implement are an error."""
    if d.get("peft_type", "LORA") != "LORA":
      raise ValueError(f"{source} holds a {d.get('peft_type')} adapter; flaxhf reads LoRA only.")
    bad = {k: d[k] for k, default in _UNSUPPORTED.items() if d.get(k, default) not in (default, None)
           or (k == "bias" and d.get(k, "none") != "none")}
    if bad:
      raise ValueError(f"{source} uses LoRA options flaxhf does not implement: {bad}. Train the "
                       "adapter without them (plain LoRA or rsLoRA), or merge it with peft first.")
    targets = d.get("target_modules")
    return cls(r=int(d["r"]), lora_alpha=float(d.get("lora_alpha", 8)),
               lora_dropout=float(d.get("lora_dropout", 0.0)),
               target_modules=sorted(targets) if isinstance(targets, (list, tuple, set)) else targets,
               modules_to_save=tuple(d["modules_to_save"]) if d.get("modules_to_save") else (),
               use_rslora=bool(d.get("use_rslora", False)))


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted module: its layer kind, sizes, leading stack dims and the weight's logical axes."""

  conv1d: bool           # GPT-2's Conv1D stores [in, out]: peft's fan_in_fan_out
  in_features: int
  out_features: int
  stack: tuple           # (num_layers,) under scan_layers, else ()
  axes: tuple            # logical axes of the base weight, stack axis included
  names: tuple           # the PyTorch module path(s): one per layer of a stack


def _path_str(path) -> str:
  return ".".join(path)


@functools.lru_cache(maxsize=32)
def _layer_kinds(model) -> Dict[tuple, bool]:
  """Module path -> is_conv1d for every Linear/Conv1D the model calls (found by tracing init)."""
  kinds = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (Linear, Conv1D)):
      kinds[tuple(context.module.path)] = isinstance(context.module, Conv1D)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda r: model.module.init(r, **model.dummy_inputs()), jax.random.key(0))
  return kinds


def _module_names(model) -> Dict[str, tuple]:
  """Every PyTorch module path that owns parameters (all dotted prefixes of the state-dict keys)
  -> its module-layout path when it is a Linear/Conv1D (or a layer of a stacked one), else ()."""
  kinds = _layer_kinds(model)
  names = {}
  for key in model._external_shapes():
    parts = key.split(".")
    for j in range(1, len(parts)):
      names.setdefault(".".join(parts[:j]), ())
  for path in kinds:
    for name in _external_names(model, path):
      names[name] = path
  return names


def _external_names(model, path) -> tuple:
  """The PyTorch module path(s) of a module-layout path: one per layer when the layers are scanned."""
  key = _path_str(path) + ".weight"
  if key not in model._stacked:
    return (_path_str(path),)
  prefix, rest = model._stacked[key]
  count = flatten_shapes(model)[key][0]
  return tuple(f"{prefix}.{i}.{rest[:-len('.weight')]}" for i in range(count))


def flatten_shapes(model) -> Dict[str, tuple]:
  return traverse_util.flatten_dict(model.param_shapes(), sep=".")


ALL_LINEAR = "all-linear"
# The output layers peft's "all-linear" leaves out (it drops model.get_output_embeddings()).
_OUTPUT_LAYERS = ("lm_head", "cls.predictions.decoder", "generator_lm_head", "lm_head.decoder")


def _all_linear(names: Dict[str, tuple]) -> list:
  """peft's target_modules="all-linear": the leaf names of every Linear/Conv1D layer but the
  output layer's, written as those names (as peft saves them)."""
  linear = [n for n, path in names.items() if path]
  output = {n.rsplit(".", 1)[-1] for n in linear if n in _OUTPUT_LAYERS}
  return sorted({n.rsplit(".", 1)[-1] for n in linear} - output)


def _suffix_match(name: str, targets) -> bool:
  return name in targets or any(name.endswith("." + t) for t in targets)


class Lora:
  """A LoraConfig resolved against one model: its targets, the modules trained in full, the math."""

  def __init__(self, model, config: LoraConfig, strict_modules_to_save: bool = True):
    if config.r <= 0:
      raise ValueError(f"LoRA needs r > 0; got r={config.r}.")
    self.config, self.model = config, model
    self.model_type, self.task = model.config.model_type, model.task
    self.task_type = PEFT_TASK_TYPES.get(model.task)
    names = _module_names(model)
    self.modules_to_save = self._resolve_save(names, strict_modules_to_save)
    self.target_modules = config.target_modules
    if self.target_modules is None:
      defaults = {**FLAXHF_DEFAULT_TARGETS, **PEFT_DEFAULT_TARGETS}
      if self.model_type not in defaults:
        raise ValueError(f"No default LoRA targets for model type {self.model_type!r}: set "
                         f"target_modules (e.g. model.lora.target_modules=q_proj,v_proj).")
      self.target_modules = list(defaults[self.model_type])
    elif self.target_modules == ALL_LINEAR:
      self.target_modules = _all_linear(names)
    self.targets = self._resolve_targets(names)

  # ---- which modules ---------------------------------------------------------------------------
  def _resolve_save(self, names, strict) -> tuple:
    c, model = self.config, self.model
    if c.modules_to_save is None:  # the head's own top-level modules, outside the base model
      if model.task not in _HEAD_TASKS:
        return ()
      prefix = model.base_model_prefix + "."
      save = sorted({k.split(".")[0] for k in model._external_shapes() if not k.startswith(prefix)})
    else:
      save = list(c.modules_to_save)
    missing = [m for m in save if not any(n.endswith(m) for n in names)]
    if missing and strict:
      raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}; "
                       f"its top-level modules are {sorted({n.split('.')[0] for n in names})}.")
    return tuple(save)

  def is_saved(self, key: str) -> bool:
    """Whether a PyTorch parameter key lies in a modules_to_save module (peft's `endswith` rule)."""
    parts = key.split(".")
    return any(".".join(parts[:j]).endswith(m) for j in range(1, len(parts))
               for m in self.modules_to_save)

  def _resolve_targets(self, names) -> Dict[tuple, Target]:
    t = self.target_modules
    if isinstance(t, str):
      matched = [n for n in names if re.fullmatch(t, n)]
    else:
      matched = [n for n in names if _suffix_match(n, t)]
    # peft leaves modules_to_save out of the LoRA targets.
    matched = [n for n in matched if not any(re.match(rf"(^|.*\.){m}($|\..*)", n)
                                             for m in self.modules_to_save)]
    layers = sorted({n.rsplit(".", 1)[-1] for n, p in names.items() if p})
    if not matched:
      raise ValueError(f"LoRA target_modules={t!r} match no module of {type(self.model).__name__}. "
                       f"Its Linear/Conv1D module names are {layers} (full paths such as "
                       f"{next(n for n, p in names.items() if p)!r}); give leaf names or a regex "
                       "over full paths, as peft takes them.")
    not_linear = [n for n in matched if not names[n]]
    if not_linear:
      raise ValueError(f"LoRA target_modules={t!r} match modules that are not Linear/Conv1D "
                       f"layers: {not_linear[:8]}. flaxhf (and peft for most of them) adapts "
                       f"Linear/Conv1D weights only; their names here are {layers}.")
    kinds, axes = _layer_kinds(self.model), traverse_util.flatten_dict(
        self.model.logical_axes(), sep=".")
    shapes = flatten_shapes(self.model)
    targets = {}
    for path in sorted({names[n] for n in matched}):
      ext = _external_names(self.model, path)
      if len(ext) > 1 and not set(ext) <= set(matched):
        raise ValueError(f"LoRA targets {sorted(set(ext) & set(matched))[:4]} but not every layer "
                         f"of {_path_str(path)}: with scan_layers the layers share one stacked "
                         "weight, so target all of them or turn scan_layers off.")
      key = _path_str(path) + ".weight"
      shape, stack = shapes[key], shapes[key][:-2]
      conv = kinds[path]
      fan_in, fan_out = (shape[-2], shape[-1]) if conv else (shape[-1], shape[-2])
      targets[path] = Target(conv, fan_in, fan_out, stack, tuple(axes[key]), ext)
    return targets

  @property
  def scale(self) -> float:
    return self.config.scale

  # ---- parameters ------------------------------------------------------------------------------
  def adapter_shapes(self) -> Dict[tuple, Tuple[tuple, tuple]]:
    """Adapter path -> (shape, logical axes): A [*stack, r, in], B [*stack, out, r]."""
    out, r = {}, self.config.r
    for path, t in self.targets.items():
      lead = t.axes[:len(t.stack)]
      in_ax, out_ax = (t.axes[-2], t.axes[-1]) if t.conv1d else (t.axes[-1], t.axes[-2])
      out[path + ("lora_A", "weight")] = (t.stack + (r, t.in_features), lead + (None, in_ax))
      out[path + ("lora_B", "weight")] = (t.stack + (t.out_features, r), lead + (out_ax, None))
    return out

  def saved_paths(self) -> list:
    """Module-layout paths of the base parameters trained in full (modules_to_save)."""
    return [tuple(p) for p in traverse_util.flatten_dict(self.model.param_shapes())
            if any(self.is_saved(n) for n in _external_names_of_param(self.model, p))]

  def trainable_shapes(self) -> Dict[tuple, Tuple[tuple, tuple]]:
    """Path -> (shape, logical axes) of everything the optimizer sees: adapters + modules_to_save."""
    shapes = traverse_util.flatten_dict(self.model.param_shapes())
    axes = traverse_util.flatten_dict(self.model.logical_axes())
    return {**self.adapter_shapes(), **{p: (shapes[p], tuple(axes[p])) for p in self.saved_paths()}}

  def init(self, rng, params) -> dict:
    """Fresh trainable params: peft's init (A kaiming-uniform, B zero) and modules_to_save copied."""
    flat, out = traverse_util.flatten_dict(params), {}
    keys = jax.random.split(rng, max(len(self.targets), 1))
    for k, (path, t) in zip(keys, self.targets.items()):
      bound = 1.0 / math.sqrt(t.in_features)  # kaiming_uniform_(a=sqrt(5)) of a [r, in] weight
      out[path + ("lora_A", "weight")] = jax.random.uniform(
          k, t.stack + (self.config.r, t.in_features), jnp.float32, -bound, bound)
      out[path + ("lora_B", "weight")] = jnp.zeros(t.stack + (t.out_features, self.config.r))
    for p in self.saved_paths():
      out[p] = jnp.asarray(flat[p], jnp.float32)
    return traverse_util.unflatten_dict(out)

  def frozen(self, params) -> dict:
    """The base params without the modules_to_save ones (those live in the trainable tree)."""
    saved = set(self.saved_paths())
    return traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(params).items()
                                         if p not in saved})

  @staticmethod
  def join(trainable, frozen) -> dict:
    """One tree for the module: the frozen base plus adapters and the trained modules_to_save."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})

  def merge(self, params) -> dict:
    """Base-layout params with each target's W + s B A (peft's merge_and_unload); adapters dropped."""
    flat = traverse_util.flatten_dict(params)
    weights = {p: tuple(flat[p + (n, "weight")] if n else flat[p + ("weight",)]
                        for n in (None, "lora_A", "lora_B")) for p in self.targets}
    merged = self._merge_fn(weights)
    out = {k: v for k, v in flat.items() if len(k) < 2 or k[-2] not in ("lora_A", "lora_B")}
    out.update({p + ("weight",): w for p, w in merged.items()})
    return traverse_util.unflatten_dict(out)

  @functools.cached_property
  def _merge_fn(self):
    conv, s = {p: t.conv1d for p, t in self.targets.items()}, self.scale

    def merge(weights):
      out = {}
      for p, (w, a, b) in weights.items():
        delta = s * jnp.einsum("...or,...ri->...oi", b.astype(jnp.float32), a.astype(jnp.float32))
        out[p] = (w.astype(jnp.float32) + (jnp.swapaxes(delta, -1, -2) if conv[p] else delta)
                  ).astype(w.dtype)
      return out

    return jax.jit(merge)

  # ---- the training forward ----------------------------------------------------------------------
  @contextlib.contextmanager
  def intercept(self, deterministic: bool = True):
    """Inside, each Linear/Conv1D whose params hold `lora_A` adds s B A dropout(x) to its output."""
    s, rate = self.scale, self.config.lora_dropout

    def lora_call(next_fun, args, kwargs, context):
      m = context.module
      if (context.method_name != "__call__" or not isinstance(m, (Linear, Conv1D))
          or not m.has_variable("params", "lora_A")):
        return next_fun(*args, **kwargs)
      y, x = next_fun(*args, **kwargs), args[0].astype(m.dtype)
      a = m.get_variable("params", "lora_A")["weight"].astype(m.dtype)
      b = m.get_variable("params", "lora_B")["weight"].astype(m.dtype)
      if not deterministic and rate > 0.0:
        x = dropout(x, rate, m.make_rng("dropout"))
      h_r = jnp.einsum("...i,ri->...r", x, a)
      return y + (s * jnp.einsum("...r,or->...o", h_r, b)).astype(y.dtype)

    with nn.intercept_methods(lora_call):
      yield

  # ---- peft files -------------------------------------------------------------------------------
  def peft_config(self, base_model_name_or_path: Optional[str] = None) -> dict:
    """adapter_config.json: the fields peft needs to rebuild this adapter exactly."""
    c = self.config
    return {"peft_type": "LORA", "task_type": self.task_type, "r": c.r,
            "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "target_modules": self.target_modules, "modules_to_save": list(self.modules_to_save)
            or None, "use_rslora": c.use_rslora,
            "fan_in_fan_out": any(t.conv1d for t in self.targets.values()), "bias": "none",
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path}

  def adapter_state_dict(self, trainable) -> Dict[str, np.ndarray]:
    """peft's adapter_model keys: `base_model.model.<module>.lora_A.weight` and modules_to_save."""
    flat, out = traverse_util.flatten_dict(trainable), {}
    for path, t in self.targets.items():
      for which in ("lora_A", "lora_B"):
        v = _to_host(flat[path + (which, "weight")])
        for i, name in enumerate(t.names):
          out[f"{PEFT_PREFIX}{name}.{which}.weight"] = v[i] if t.stack else v
    saved = {_path_str(p): _to_host(flat[p]) for p in self.saved_paths()}
    out.update({PEFT_PREFIX + k: v for k, v in self.model._unstack(saved).items()})
    return out

  def save(self, directory: str, trainable, base_model_name_or_path: Optional[str] = None):
    """Writes adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained does."""
    state = self.adapter_state_dict(trainable)  # every process takes part in the gather
    if jax.process_index() != 0:
      return
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
      json.dump(self.peft_config(base_model_name_or_path), f, indent=2)

  def from_state_dict(self, state: Dict[str, np.ndarray], params, source: str) -> dict:
    """The trainable tree from peft adapter weights; missing, unexpected or mis-shaped keys raise."""
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    state = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k): v for k, v in state.items()}
    used, problems, out = set(), [], {}
    for path, (shape, _) in self.adapter_shapes().items():
      which, t = path[-2], self.targets[path[:-2]]
      keys = [f"{name}.{which}.weight" for name in t.names]
      missing = [k for k in keys if k not in state]
      if missing:
        problems.append(f"missing {missing[:4]}")
        continue
      used.update(keys)
      value = np.stack([state[k] for k in keys]) if t.stack else state[keys[0]]
      if tuple(value.shape) != shape:
        problems.append(f"{keys[0]} is {list(value.shape[len(t.stack):])} but "
                        f"{t.names[0]} ({t.in_features} in, {t.out_features} out, r="
                        f"{self.config.r}) needs {list(shape[len(t.stack):])}")
      out[path] = np.asarray(value, np.float32)
    flat_params = traverse_util.flatten_dict(params) if self.modules_to_save else {}
    for p in self.saved_paths():
      ext = _external_names_of_param(self.model, p)
      if all(k in state for k in ext):
        used.update(ext)
        value = np.stack([state[k] for k in ext]) if len(ext) > 1 else state[ext[0]]
        if tuple(value.shape) != tuple(flat_params[p].shape):
          problems.append(f"{ext[0]} is {list(value.shape)}, the model's is "
                          f"{list(flat_params[p].shape)}")
        out[p] = np.asarray(value, np.float32)
      else:  # peft saves every modules_to_save weight; a head it did not save keeps the base's
        out[p] = np.asarray(flat_params[p], np.float32)
    unexpected = sorted(set(state) - used)
    if unexpected:
      problems.append(f"unexpected keys {unexpected[:6]}")
    if problems:
      raise ValueError(f"The adapter in {source} does not fit {type(self.model).__name__} "
                       f"({self.model_type}): " + "; ".join(problems) + ". Was it trained on "
                       "another base model?")
    return traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in out.items()})


def _external_names_of_param(model, path) -> tuple:
  """The PyTorch key(s) of one module-layout parameter path (one per layer when stacked)."""
  key = _path_str(path)
  if key not in model._stacked:
    return (key,)
  prefix, rest = model._stacked[key]
  return tuple(f"{prefix}.{i}.{rest}" for i in range(flatten_shapes(model)[key][0]))


def _to_host(v) -> np.ndarray:
  from jax.experimental import multihost_utils
  if isinstance(v, jax.Array) and not v.is_fully_addressable:
    v = multihost_utils.process_allgather(v, tiled=True)
  return np.asarray(jax.device_get(v), np.float32)


def read_adapter(directory: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """(adapter_config.json, weights) of a peft adapter folder."""
  from flaxhf.models import io
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: an adapter folder holds {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS} (peft's save_pretrained writes both).")
  with open(config_path) as f:
    config = json.load(f)
  if os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS)):
    state = io._load_safetensors(os.path.join(directory, ADAPTER_WEIGHTS))
  elif os.path.isfile(os.path.join(directory, ADAPTER_BIN)):
    state = io._load_torch_bin(os.path.join(directory, ADAPTER_BIN))
  else:
    raise FileNotFoundError(f"No adapter weights in {directory}: expected {ADAPTER_WEIGHTS}.")
  return config, state


def load_adapter(model, directory: str, params) -> Tuple[Lora, dict]:
  """(Lora, trainable tree) from a peft adapter folder, for `model` whose base params are `params`."""
  config, state = read_adapter(directory)
  lora = Lora(model, LoraConfig.from_peft(config, os.path.join(directory, ADAPTER_CONFIG)),
              strict_modules_to_save=False)  # peft's task type adds names a model may lack
  return lora, lora.from_state_dict(state, params, directory)


def merge_adapter(model, directory: str, params) -> dict:
  """`params` with a peft adapter folder merged in: what `from_pretrained(..., adapter=)` runs."""
  lora, trainable = load_adapter(model, directory, params)
  return lora.merge(Lora.join(trainable, params))
