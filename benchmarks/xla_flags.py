"""Measures XLA CPU options on flaxhf's train step, each in a fresh process, to choose
flaxhf/xla_cpu.py's OPTIONS for this CPU kind.

  python benchmarks/xla_flags.py [--models minilm] [--dtypes float32,bfloat16] [--steps 3]
      [--candidates "FLAGS;FLAGS;..."]

Runs benchmarks/train_step.py (flaxhf only; PyTorch once, under XLA's defaults, as the reference)
under each XLA_FLAGS setting with FLAXHF_XLA_CPU=none, so the row shows that setting alone, and
prints the rows side by side after the machine header (benchmarks/machine.py). A flag this jaxlib
does not know makes its row say so rather than stop the sweep.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import machine  # noqa: E402

CANDIDATES = [
    "",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_enable_fast_math=true",
]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="minilm")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--candidates", default=None, help="';'-separated XLA_FLAGS settings to try "
                 "(default: the list in this file; the first row is always XLA's defaults)")
  args = p.parse_args()
  candidates = [""] + [c.strip() for c in args.candidates.split(";")] if args.candidates else \
      CANDIDATES
  machine.print_header(tuple(args.dtypes.split(",")), title="xla_flags.py (default XLA_FLAGS)")
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
  names = tuple(args.models.split(","))
  for i, flags in enumerate(candidates):
    env = dict(os.environ, XLA_FLAGS=flags, FLAXHF_XLA_CPU="none")
    cmd = [sys.executable, script, "--models", args.models, "--dtypes", args.dtypes,
           "--steps", str(args.steps)] + ([] if i == 0 else ["--skip_torch"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [l for l in out.stdout.splitlines() if l.startswith(names + ("model", "GEMM"))]
    print(f"== XLA_FLAGS={flags!r}" + ("" if out.returncode == 0 else
                                        f"  FAILED: {out.stderr.strip().splitlines()[-1:]}"))
    for row in rows:
      print("   ", row)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
