"""Fine-tunes a Hugging Face model with flaxhf.

  python launch/run.py --config configs/text_classification.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Rerunning the same command in the same workdir resumes from its latest checkpoint.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Task config file[:args].", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the export.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The distributed runtime must start before anything asks JAX for devices.
  from flaxhf import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "FLAXHF_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flaxhf_xla")))
  logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from flaxhf.train import engine
  results = engine.run(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print("eval_results:", results, flush=True)


if __name__ == "__main__":
  app.run(main)
