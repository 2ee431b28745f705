"""Measures XLA CPU options on flaxhf's train step, each in a fresh process, to choose
flaxhf/xla_cpu.py's OPTIONS for this CPU kind.

  python benchmarks/xla_flags.py [--models minilm] [--dtypes float32,bfloat16] [--steps 3]
      [--candidates "FLAGS;FLAGS;..."] [--repeat N]

Runs benchmarks/train_step.py (flaxhf only; PyTorch once, in the first row, as the reference)
under each setting, given as FLAXHF_XLA_CPU (flaxhf/xla_cpu.py: those flags instead of this CPU
kind's OPTIONS, bf16 dense layers as the kind has them), and prints the rows side by side after the
machine header (benchmarks/machine.py). The first row is "none": XLA's defaults and plain bf16
dots; the second "auto", what a run gets now. A flag this jaxlib does not know makes its row say so
rather than stop the sweep. --repeat runs the list several times, to see the noise.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import machine  # noqa: E402

CANDIDATES = [
    "none",
    "auto",
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
  p.add_argument("--candidates", default=None, help="';'-separated FLAXHF_XLA_CPU settings to "
                 "try after 'none' and 'auto' (default: the list in this file)")
  p.add_argument("--repeat", type=int, default=1)
  args = p.parse_args()
  candidates = CANDIDATES[:2] + [c.strip() for c in args.candidates.split(";")] \
      if args.candidates else CANDIDATES
  machine.print_header(tuple(args.dtypes.split(",")), title="xla_flags.py")
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
  names = tuple(args.models.split(","))
  for i, setting in enumerate(candidates * args.repeat):
    env = dict(os.environ, FLAXHF_XLA_CPU=setting)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, script, "--models", args.models, "--dtypes", args.dtypes,
           "--steps", str(args.steps)] + ([] if i == 0 else ["--skip_torch"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    rows = [l for l in out.stdout.splitlines() if l.startswith(names + ("model", "GEMM"))]
    print(f"== FLAXHF_XLA_CPU={setting!r}" + ("" if out.returncode == 0 else
                                               f"  FAILED: {out.stderr.strip().splitlines()[-1:]}"))
    for row in rows:
      print("   ", row)
    sys.stdout.flush()


if __name__ == "__main__":
  main()
