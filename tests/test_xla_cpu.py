"""flaxhf.xla_cpu: XLA:CPU options chosen once, by CPU kind, with the user's settings winning."""

import json
import os
import subprocess
import sys

import pytest
from engine_utils import child_env

from flaxhf import xla_cpu
from flaxhf.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags,kind", [
    ("fpu avx2 fma avx512f avx512_bf16 amx_tile amx_bf16", "amx"),  # Sapphire Rapids
    ("fpu avx2 fma avx512f avx512_bf16", "avx512_bf16"),  # Zen 4
    ("fpu avx2 fma avx512f", "avx512"),
    ("fpu avx2 fma", "avx2"),
    ("fpu neon", "other"),
])
def test_cpu_kind_is_the_best_matrix_instruction_set(flags, kind):
  info = {"model name": "Some CPU", "cpu family": "25", "model": "17", "flags": flags}
  assert xla_cpu.cpu_kind(info) == (kind, "Some CPU (cpu family 25, model 17)")
  assert kind in xla_cpu.OPTIONS or kind == "other"


def configure_in_child(setting=None, xla_flags="", env_setting=None):
  """Runs configure() in a fresh process, then one jitted computation; returns what it saw."""
  code = f"""
import json, os
from flaxhf import xla_cpu
choice = xla_cpu.configure({setting!r})
import jax, jax.numpy as jnp
jax.jit(lambda x: x * 2)(jnp.ones(3)).block_until_ready()
print(json.dumps(dict(flags=choice.flags, kept=choice.kept, applied=choice.applied,
                      source=choice.source, xla_flags=os.environ["XLA_FLAGS"], text=str(choice))))
"""
  env = child_env(1, XLA_FLAGS=xla_flags)
  env.pop(xla_cpu.ENV, None)
  if env_setting:
    env[xla_cpu.ENV] = env_setting
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_explicit_flags_reach_xla(tmp_path):
  # --xla_dump_to has a visible effect: XLA writes the program's HLO there.
  dump = tmp_path / "dump"
  seen = configure_in_child(env_setting=f"--xla_dump_to={dump}")
  assert seen["applied"] and seen["source"] == xla_cpu.ENV
  assert seen["flags"] == [f"--xla_dump_to={dump}"]
  assert any(name.endswith(".txt") for name in os.listdir(dump)), "XLA did not read the flag"


def test_the_users_xla_flags_win_and_the_argument_beats_the_environment():
  seen = configure_in_child(
      setting="--xla_cpu_prefer_vector_width=512 --xla_cpu_enable_fast_min_max=false",
      xla_flags="--xla_force_host_platform_device_count=2 --xla_cpu_prefer_vector_width=256",
      env_setting="--xla_cpu_use_onednn=true")
  assert seen["source"] == "argument"
  assert seen["kept"] == ["--xla_cpu_prefer_vector_width=512"]
  assert seen["flags"] == ["--xla_cpu_enable_fast_min_max=false"]
  assert seen["xla_flags"] == ("--xla_force_host_platform_device_count=2 "
                               "--xla_cpu_prefer_vector_width=256 --xla_cpu_enable_fast_min_max=false")
  assert "kept from XLA_FLAGS" in seen["text"]


def test_auto_applies_this_kinds_options_and_none_adds_nothing():
  kind, _ = xla_cpu.cpu_kind()
  seen = configure_in_child()
  assert seen["source"] == "auto" and seen["flags"] == list(xla_cpu.OPTIONS.get(kind, ()))
  seen = configure_in_child(setting="none")
  assert seen["flags"] == [] and seen["xla_flags"] == "" and "XLA's defaults" in seen["text"]


def test_after_the_backend_started_it_says_the_options_cannot_apply(monkeypatch, caplog):
  import jax
  jax.devices()  # this test process's backend is running
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  monkeypatch.setattr(xla_cpu, "_configured", None)  # restored after: other tests see auto
  choice = xla_cpu.configure("--xla_cpu_prefer_vector_width=512")
  assert not choice.applied and "NOT applied" in str(choice)
  assert any("NOT applied" in r.getMessage() for r in caplog.records)


def test_a_setting_that_is_not_flags_names_the_forms(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  with pytest.raises(ConfigError, match="'auto', 'none'"):
    xla_cpu.configure("prefer_vector_width=512")


@pytest.mark.parametrize("w_in_axis", [1, 0])
def test_bf16_dense_reads_bf16_and_accumulates_in_float32_both_ways(monkeypatch, w_in_axis):
  import re

  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxhf.models.layers import dense
  monkeypatch.setattr(xla_cpu, "f32_accumulating_dots", lambda: True)  # on any CPU kind
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 5, 64), jnp.bfloat16)
  w32 = jnp.asarray(rng.randn(*((32, 64) if w_in_axis else (64, 32))) * 0.1, jnp.float32)

  def loss(x, w, dtype):
    y = dense(x, w, dtype, w_in_axis=w_in_axis)
    return jnp.sum(y.astype(jnp.float32) * jnp.arange(32.0)), y

  grads = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
  (dx, dw), y = grads(x, w32, jnp.bfloat16)
  (dx_ref, dw_ref), y_ref = grads(x.astype(jnp.float32), w32.astype(jnp.bfloat16).astype(
      jnp.float32), jnp.float32)  # the same bf16 values, in float32 throughout
  assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)
  # Forward, input gradient and weight gradient: three dots, each bf16 x bf16 -> f32.
  hlo = grads.lower(x, w32, jnp.bfloat16).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \((.*?)\) -> (.*)", hlo)
  assert len(dots) == 3, hlo
  for operands, result in dots:
    assert operands.count("bf16") == 2 and "f32" in result, (operands, result)
