"""Exports any flaxhf checkpoint to a PyTorch `save_pretrained` folder.

  python launch/export.py --checkpoint WORKDIR/checkpoints/STEP --out OUT [--tokenizer DIR]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("checkpoint", None, "A checkpoint folder, WORKDIR/checkpoints/STEP.")
flags.DEFINE_string("out", None, "Output folder (config.json, model.safetensors, tokenizer).")
flags.DEFINE_string("tokenizer", None, "Tokenizer folder; default WORKDIR/tokenizer.")
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from flaxhf.train.engine import export_checkpoint
  print("exported to", export_checkpoint(FLAGS.checkpoint, FLAGS.out, FLAGS.tokenizer))


if __name__ == "__main__":
  app.run(main)
