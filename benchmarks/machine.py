"""The machine header every benchmark prints before its table: hardware, libraries, GEMM peaks.

A ratio means little without the machine it was measured on (issue 13: the same script gave 1.49x
on an AMD EPYC and 0.76x on a Sapphire Rapids Xeon), so each report says which CPU, how many cores,
which matrix instructions, which library builds, and what a plain matmul reaches there.

  python benchmarks/machine.py [--dtypes float32,bfloat16]   # the header alone
"""

import argparse
import os
import platform
import re
import time

# The flags that decide which matmul kernels a CPU can run (bf16 dot products, AMX tiles).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
             "amx_int8")


def cpu_description() -> dict:
  """CPU model, family/model numbers, core counts and the matmul-relevant flags."""
  from flaxhf.xla_cpu import cpuinfo
  info = cpuinfo()
  flags = set(info.get("flags", "").split())
  # Under a hypervisor "model name" can be as vague as "AMD EPYC": family/model pin the generation.
  ident = ", ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info)
  return {"model": info.get("model name") or platform.processor() or platform.machine(),
          "ident": ident, "cpu_count": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "flags": {f: f in flags for f in CPU_FLAGS} if flags else {}}


def gpu_description() -> list:
  """The accelerators JAX sees (empty on a CPU-only machine)."""
  import jax
  return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices() if d.platform != "cpu"]


def torch_build() -> str:
  """oneDNN/MKL availability and the BLAS lines of torch.__config__.show(), on one line."""
  import torch
  show = torch.__config__.show()
  pick = {"MKL": r"Math Kernel Library Version ([\d.]+)", "oneDNN": r"MKL-DNN (v[\d.]+)",
          "CPU capability": r"CPU capability usage: (\S+)", "BLAS": r"BLAS_INFO=(\w+)"}
  found = [f"{name} {m.group(1)}" for name, rx in pick.items() if (m := re.search(rx, show))]
  return (f"mkldnn.is_available={torch.backends.mkldnn.is_available()}, "
          f"mkl.is_available={torch.backends.mkl.is_available()}; " + ", ".join(found))


def library_versions() -> dict:
  import importlib
  versions = {}
  for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
    try:
      versions[name] = importlib.import_module(name).__version__
    except ImportError:
      versions[name] = "not installed"
  return versions


def _jax_matmul_rate(n, dtype, reps, device):
  import jax
  import jax.numpy as jnp
  a = jax.device_put(jnp.ones((n, n), getattr(jnp, dtype)), device)
  # A 16-bit matmul as flaxhf's dense layers write it (flaxhf.models.layers.dense): accumulated in
  # float32 where flaxhf.xla_cpu chose that for this CPU, else the plain dot.
  from flaxhf.models.layers import dense
  f = jax.jit(lambda x: dense(x, x, x.dtype))
  f(a).block_until_ready()  # compile and warm up
  t = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t)


def _torch_matmul_rate(n, dtype, reps, device):
  import torch
  b = torch.ones(n, n, dtype=getattr(torch, dtype), device=device)
  b @ b  # warm up (thread pool, oneDNN primitive cache)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  sync()
  t = time.perf_counter()
  for _ in range(reps):
    b @ b
  sync()
  return 2 * n**3 * reps / (time.perf_counter() - t)


def gemm_peaks(dtypes=("float32",), n=2048, reps=10) -> dict:
  """{(platform, dtype): {"jax": FLOP/s, "torch": FLOP/s}} from an n x n matmul, on CPU and GPU."""
  import jax
  import torch
  peaks = {}
  targets = [("cpu", jax.devices("cpu")[0], "cpu", n)]
  if jax.default_backend() != "cpu":
    targets.append(("gpu", jax.devices()[0], "cuda" if torch.cuda.is_available() else None, 8192))
  for plat, jax_device, torch_device, size in targets:
    for dtype in dtypes:
      peaks[plat, dtype] = {
          "jax": _jax_matmul_rate(size, dtype, reps, jax_device),
          "torch": (_torch_matmul_rate(size, dtype, reps, torch_device)
                    if torch_device else float("nan"))}
  return peaks


def print_header(dtypes=("float32",), title=None) -> dict:
  """Prints the machine header (and measures the GEMM peaks of `dtypes`); returns the peaks.

  Applies flaxhf's XLA:CPU options first (flaxhf/xla_cpu.py: by CPU kind, FLAXHF_XLA_CPU
  overrides), as launch/run.py does, so a benchmark measures what a user's run compiles."""
  from flaxhf import xla_cpu
  choice = xla_cpu.configure()
  import jax
  import torch
  cpu = cpu_description()
  if title:
    print(f"== {title}")
  print(f"CPU: {cpu['model']}" + (f" ({cpu['ident']})" if cpu["ident"] else "") +
        f"; os.cpu_count {cpu['cpu_count']}, affinity {cpu['affinity']}; "
        f"torch threads {torch.get_num_threads()}")
  if cpu["flags"]:
    print("CPU flags: " + " ".join(f"{f}={'yes' if v else 'no'}" for f, v in cpu["flags"].items()))
  gpus = gpu_description()
  print("GPU: " + (", ".join(gpus) if gpus else "none seen by jax") +
        (f"; torch.cuda {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
  print("versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()) +
        f"; python {platform.python_version()}")
  print(f"torch build: {torch_build()}")
  print(f"jax backend {jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"flaxhf.xla_cpu: {choice}")
  peaks = gemm_peaks(dtypes)
  for (plat, dtype), p in peaks.items():
    print(f"GEMM peak {plat} {dtype}: jax {p['jax'] / 1e9:.1f} GFLOP/s, torch "
          f"{p['torch'] / 1e9:.1f} GFLOP/s")
  try:
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  except OSError:
    pass
  print(flush=True)
  return peaks


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--dtypes", default="float32")
  print_header(tuple(p.parse_args().dtypes.split(",")))


if __name__ == "__main__":
  main()
