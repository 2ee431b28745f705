"""XLA:CPU compiler options, chosen in this one place by the kind of CPU the process runs on.

XLA reads its flags once, when JAX starts its CPU backend, and they then apply to every program the
process compiles: the train step, evaluation and generation alike. `configure` therefore runs
before anything asks JAX for devices: launch/run.py calls it first thing (and logs the choice); a
script of your own calls `flaxhf.xla_cpu.configure()` at its top.

The choice, in order:
  1. the `setting` argument (launch/run.py passes the config's `xla_cpu`), else
  2. the environment variable FLAXHF_XLA_CPU, else
  3. "auto": the options measured to help on this CPU kind (`OPTIONS`).
A setting is "auto", "none" (XLA's defaults), or the flags themselves ("--xla_cpu_...=... ...").
A flag already in XLA_FLAGS is yours and wins over the same flag here. On a machine whose only
backend is not the CPU, nothing changes (the options name XLA:CPU alone).
"""

import dataclasses
import functools
import logging
import os
import shlex

from flaxhf.errors import ConfigError

ENV = "FLAXHF_XLA_CPU"
log = logging.getLogger("flaxhf")

# By CPU kind (`cpu_kind()`): XLA_FLAGS each kind runs with under "auto", with what decided them.
# Measured with benchmarks/xla_flags.py (every candidate, flaxhf's train step, fp32 and bf16);
# a kind not listed gets XLA's defaults.
OPTIONS = {
    # AMD EPYC family 25 model 17 (Zen 4), 2 cores, 2026-12-07, MiniLM 32x128 train step fp32 /
    # bf16 tok/s, XLA's defaults 1609 / 1923: no candidate beat them beyond the run-to-run noise
    # (~5%, more in bf16): oneDNN dot fusion 1681, 1569, 1515 / 2023, 2059; oneDNN 1547 / -;
    # prefer_vector_width=512 1406; YNN dot fusion 1441; XNN dot fusion 1482; XNN graph fusion
    # 1578; XNNPACK off 1452; fast math 1568 (and inexact). So XLA's defaults.
    "avx512_bf16": (),
    # Not measured here (no such machine in this session): XLA's defaults until measured.
    "amx": (),
    "avx512": (),
    "avx2": (),
}
# Kinds whose bf16 matrix instructions make 16-bit dense layers run as bf16 inputs accumulated in
# float32 (flaxhf.models.layers.dense): XLA:CPU converts a bf16 x bf16 -> bf16 dot to float32
# before any library sees it, but sends bf16 x bf16 -> float32 to its bf16 kernels (1.6x its
# float32 GEMM on the Zen 4 above, benchmarks/train_step.py's GEMM lines).
BF16_DOT_KINDS = ("avx512_bf16", "amx")


@dataclasses.dataclass(frozen=True)
class Choice:
  """What `configure` decided: the CPU, where the setting came from, the flags it added."""

  kind: str
  cpu: str
  source: str  # "argument", FLAXHF_XLA_CPU, or "auto"
  flags: tuple  # the flags this call put into XLA_FLAGS
  kept: tuple  # flags of the choice that XLA_FLAGS already set (yours win)
  applied: bool  # False when JAX's CPU backend had started before the call
  bf16_dots: bool  # 16-bit dense layers as bf16 inputs accumulated in float32

  def __str__(self):
    chosen = " ".join(self.flags) or "XLA's defaults"
    text = f"XLA:CPU options for {self.cpu} (kind {self.kind}, {self.source}): {chosen}"
    text += "; bf16 dense layers accumulate in float32" if self.bf16_dots else ""
    if self.kept:
      text += f"; kept from XLA_FLAGS: {' '.join(self.kept)}"
    if not self.applied:
      text += (" -- NOT applied: JAX's CPU backend had already started; call "
               "flaxhf.xla_cpu.configure() before the first jax.devices() or computation")
    return text


def cpuinfo() -> dict:
  """The first processor's fields of /proc/cpuinfo ({} off Linux)."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
  except OSError:
    pass
  return info


@functools.lru_cache(maxsize=1)
def _this_cpu() -> tuple:
  return cpu_kind(cpuinfo())


def cpu_kind(info: dict = None) -> tuple:
  """(kind, description) of this CPU: kind is the best matrix instruction set it has — "amx"
  (Intel AMX tiles), "avx512_bf16", "avx512", "avx2" or "other"."""
  if info is None:
    return _this_cpu()
  flags = set(info.get("flags", "").split())
  if "amx_bf16" in flags:
    kind = "amx"
  elif "avx512_bf16" in flags:
    kind = "avx512_bf16"
  elif "avx512f" in flags:
    kind = "avx512"
  elif "avx2" in flags:
    kind = "avx2"
  else:
    kind = "other"
  name = info.get("model name", "unknown CPU")
  ident = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model") if k in info)
  return kind, f"{name} ({ident})" if ident else name


def _flag_name(flag: str) -> str:
  return flag.lstrip("-").split("=", 1)[0]


def _parse(setting: str, kind: str) -> tuple:
  if setting == "auto":
    return tuple(OPTIONS.get(kind, ()))
  if setting == "none":
    return ()
  flags = tuple(shlex.split(setting))
  bad = [f for f in flags if not f.startswith("--xla_")]
  if bad:
    raise ConfigError(f"xla_cpu setting {setting!r}: {bad} is not an XLA flag. Use 'auto', 'none' "
                     "or flags such as '--xla_cpu_prefer_vector_width=512'.")
  return flags


def _backend_started() -> bool:
  import jax._src.xla_bridge as xb  # pylint: disable=import-outside-toplevel
  return bool(getattr(xb, "_backends", None))


def configure(setting: str = None) -> Choice:
  """Puts this CPU kind's options (or `setting`'s) into XLA_FLAGS and returns what it chose.

  Call it before the first JAX computation; after, the options cannot take effect and the returned
  Choice says so (`applied=False`; a warning is logged too)."""
  source = "argument" if setting else ENV if os.environ.get(ENV) else "auto"
  setting = (setting or os.environ.get(ENV) or "auto").strip()
  kind, cpu = cpu_kind()
  wanted = _parse(setting, kind)
  current = shlex.split(os.environ.get("XLA_FLAGS", ""))
  present = {_flag_name(f) for f in current}
  kept = tuple(f for f in wanted if _flag_name(f) in present)
  added = tuple(f for f in wanted if _flag_name(f) not in present)
  applied = not (added and _backend_started())
  if added:
    os.environ["XLA_FLAGS"] = " ".join(current + list(added))
  choice = Choice(kind=kind, cpu=cpu, source=source, flags=added, kept=kept, applied=applied,
                  bf16_dots=setting != "none" and kind in BF16_DOT_KINDS)
  global _configured
  _configured = choice
  (log.info if applied else log.warning)("%s", choice)
  return choice


_configured = None  # the last configure()'s Choice


def f32_accumulating_dots() -> bool:
  """Whether 16-bit dense layers compute as bf16 inputs accumulated in float32 here: on the CPU
  backend, for the kinds in BF16_DOT_KINDS, unless configure() was told "none"."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() != "cpu":
    return False
  if _configured is not None:
    return _configured.bf16_dots
  return cpu_kind()[0] in BF16_DOT_KINDS
