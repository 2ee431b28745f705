"""Fine-tunes a Hugging Face model with flaxhf.

  python launch/run.py --config configs/text_classification.py[:ARGS] --workdir DIR [--config.KEY=VALUE ...]
      [--coordinator_address=HOST:PORT --num_processes=N --process_id=I] [--dry_run]

Rerunning the same command in the same workdir resumes from its latest checkpoint. On SLURM, Open
MPI, a Kubernetes indexed Job / JobSet or a Cloud TPU pod the processes find each other without
flags. --dry_run prints the cluster, processes, devices and mesh the run would use, and exits.
Exit codes: 0 done, 64 a user error (missing data or model, mistyped key, offline hub: one message,
no traceback; --debug or FLAXHF_DEBUG=1 shows it), 75 preempted (checkpoint saved: rerun), 65
non-finite loss, 78 bad cluster environment (see flaxhf/train/faults.py).
"""

import difflib
import logging
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/
# Training needs no torch; without it transformers' import advises that "Models won't be available",
# which is not news to a flaxhf user.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Task config file[:args].", lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the export.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.DEFINE_bool("dry_run", False, "Print the detected cluster, processes, devices and mesh, then "
                  "exit without loading data or models.")
flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (or FLAXHF_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _unknown_key_message(argv):
  """The error for the first `--config.KEY` override that names no config field; None if none."""
  config_arg = _config_arg(argv)
  if config_arg is None:
    return None
  config = FLAGS["config"].parser.parse(config_arg)
  for arg in argv:
    match = re.match(r"--?config\.([\w.]+)(=|$)", arg)
    if not match:
      continue
    node, parents = config, []
    for name in match.group(1).split("."):
      if not isinstance(node, ml_collections.ConfigDict):
        return f"--config.{match.group(1)}: {'.'.join(parents)} is a value, not a section."
      if name not in node:
        where, keys = ".".join(parents) or "the config", sorted(node.keys())
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"--config.{match.group(1)}: {where} has no key {name!r}{hint}. "
                f"Valid keys of {where}: {', '.join(keys)}.")
      node, parents = node[name], parents + [name]
  return None


EXIT_USER_ERROR = 64  # sysexits.h EX_USAGE


def _config_arg(argv):
  """The value of --config (path[:args]) in argv, or None."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if value is None and "--config" in argv[:-1]:
    value = argv[argv.index("--config") + 1]
  return value


def _user_error(error):
  """The flaxhf UserError that `error` is or was raised from (the innermost one), else None."""
  from flaxhf.errors import UserError
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError):
      found = error  # ml_collections re-raises a config's error with the traceback in its text
    error = error.__cause__ or error.__context__
  return found


def _missing_data_hint(error, argv):
  """For a `local` run whose data file is missing: where local data comes from, and the hub form."""
  from flaxhf.data.sources import DataError
  config_arg = _config_arg(argv) or ""
  path, _, args = config_arg.partition(":")
  if not isinstance(error, DataError) or "not found" not in str(error) or "local" not in args.split(","):
    return ""
  from configs import common
  hub_args = ",".join(a for a in args.split(",") if a and a != "local")
  hub_config = f"{path}:{hub_args}" if hub_args else path
  try:
    FLAGS["config"].parser.parse(hub_config)
  except Exception:  # pylint: disable=broad-except  # a local-only variant: name the plain config
    hub_config = path
  rest = " ".join(a for a in argv[1:] if not a.startswith("--config") and a != config_arg)
  return (f"\nThe `local` variants read the data bundled under FLAXHF_DATA (now "
          f"{os.path.abspath(common.DATA_DIR)}), laid out as this project's shared/data: set "
          f"FLAXHF_DATA to that folder. With internet access, the hub form of this run downloads "
          f"its data and model instead:\n  python launch/run.py --config {hub_config} {rest}")


def _exit_if_user_error(error, argv):
  """A user error ends the run with one clear message (exit 64); anything else is re-raised."""
  user_error = _user_error(error)
  debug = "--debug" in argv or os.environ.get("FLAXHF_DEBUG", "") not in ("", "0")
  if user_error is None or debug:
    raise error
  print(f"flaxhf: error: {user_error}{_missing_data_hint(user_error, argv)}", file=sys.stderr,
        flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv):
  """absl's flag parsing, except that a mistyped --config.KEY exits with the valid keys and a
  config file's user error with its message alone."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # how ml_collections reports an override of a missing field
    message = _unknown_key_message(argv)
    if message is None:
      _exit_if_user_error(e, argv)
    sys.exit(f"FATAL Flags parsing error: {message}")
  except flags.Error as e:
    if _user_error(e) is not None:
      _exit_if_user_error(e, argv)
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
  except Exception as e:  # pylint: disable=broad-except  # e.g. a missing optional package
    _exit_if_user_error(e, argv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # app.run already gave the root logger absl's handler, so basicConfig needs force=True. Set up
  # before the distributed runtime starts so its "process i of n" line is seen on every process.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    cfg = FLAGS.config  # a config file's OSError (e.g. a missing model folder) surfaces here
  except Exception as e:  # pylint: disable=broad-except
    _exit_if_user_error(e, sys.argv)
  # XLA reads its options when JAX starts its backend: they are chosen before anything else.
  from flaxhf import xla_cpu
  try:
    xla_cpu.configure(None if cfg.xla_cpu == "auto" else cfg.xla_cpu)
  except Exception as e:  # pylint: disable=broad-except  # a malformed setting: one message
    _exit_if_user_error(e, sys.argv)
  # The distributed runtime must start before anything asks JAX for devices.
  from flaxhf import distributed
  from flaxhf.train import faults
  try:
    cluster = distributed.detect(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    distributed.initialize(cluster, cfg.cluster.heartbeat_timeout_s,
                           cfg.cluster.initialization_timeout_s)
  except distributed.ClusterError as e:
    logging.error("%s", e)
    sys.exit(faults.EXIT_CLUSTER)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "FLAXHF_COMPILATION_CACHE", os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
          os.path.expanduser("~"), ".cache", "flaxhf_xla")))
  if jax.process_index() != 0:
    # Other processes log only warnings and flaxhf's per-process facts (devices, data share).
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("flaxhf").setLevel(logging.INFO)
  from flaxhf import sharding
  facts = distributed.report(cluster, sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp,
                                                         cfg.mesh.tensor))
  logging.getLogger("flaxhf").info(facts)  # every process: which one is which, in each log
  if FLAGS.dry_run:
    print(facts, flush=True)
    print(f"Dry run: train.batch_size={cfg.train.batch_size} gives each of the "
          f"{jax.process_count()} processes {cfg.train.batch_size / jax.process_count():g} rows a "
          f"step; mesh.rules={cfg.mesh.rules}. No data or model was loaded.", flush=True)
    return
  from flaxhf.train import engine
  try:
    results = engine.run(cfg, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    code = faults.exit_code(e)
    if code is None:
      _exit_if_user_error(e, sys.argv)
    logging.error("%s", e)
    sys.exit(code)
  if jax.process_index() == 0:
    print("eval_results:", results, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
