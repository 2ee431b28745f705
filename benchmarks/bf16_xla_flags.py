"""Tries XLA CPU options that might speed up bf16 training, each in a fresh process.

  python benchmarks/bf16_xla_flags.py [--model minilm] [--steps 3]

Runs benchmarks/train_step.py (flaxhf only; PyTorch once, with the default flags, as the reference)
under each XLA_FLAGS setting and prints the rows side by side, after the machine header
(benchmarks/machine.py); each row's GEMM peaks are measured under its own flags. A flag this
jaxlib does not know makes its row say so rather than stop the sweep.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import machine  # noqa: E402

CANDIDATES = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="minilm")
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args()
  machine.print_header(("float32", "bfloat16"), title="bf16_xla_flags.py (default XLA_FLAGS)")
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
  for i, flags in enumerate(CANDIDATES):
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, script, "--models", args.model, "--dtypes", "float32,bfloat16",
           "--steps", str(args.steps)] + ([] if i == 0 else ["--skip_torch"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [l for l in out.stdout.splitlines() if l.startswith((args.model, "model", "GEMM"))]
    print(f"== XLA_FLAGS={flags!r}" + ("" if out.returncode == 0 else
                                        f"  FAILED: {out.stderr.strip().splitlines()[-1:]}"))
    for row in rows:
      print("   ", row)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
