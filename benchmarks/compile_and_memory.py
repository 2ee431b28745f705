"""Train-step compile time (cold and with the persistent cache) and memory per device by mesh rules.

  python benchmarks/compile_and_memory.py [--models bert-base,bert-large] [--batch 8x128]
      [--execute bert-base] [--quick]

Prints the machine header (benchmarks/machine.py), then two tables for BERT sequence
classification (AdamW, fp32, random weights), each model also with `scan_layers=True` ("n/a" where
the model does not take that keyword):
  compile: each number from a fresh process on one CPU device, with launch/run.py's persistent
    compilation cache (jax_compilation_cache_dir) in a new empty folder ("cold") and then the same
    folder ("warm"). lower = trace + lowering to StableHLO, compile = XLA compile (a cache read when
    warm); for the `--execute` models the warm process also builds real weights and runs the step:
    1st step = lower + compile + the first execution, step = the second execution. Weight and
    optimizer initialisation (their own small programs) is not counted. Each cell is wall/CPU
    seconds: the process's CPU time (all threads) is what other jobs on the machine cannot inflate.
  memory: per device on 8 simulated CPU devices (XLA_FLAGS set before JAX starts, in a subprocess)
    for the rule tables dp (data=8), fsdp (fsdp=8) and fsdp_tp (fsdp=4 x tensor=2): params + AdamW
    state from the state's shardings, and XLA's memory analysis of the compiled step (arguments,
    temporaries, and total = arguments + outputs - donated aliases + temporaries + code). Compiled
    without LLVM optimisation, which leaves buffer sizes as they are (flaxhf/train/memory.py).
`--quick` uses a tiny BERT (2 layers x 64, vocab 1024) at 8x16 to check the script quickly.
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

MODELS = {  # transformers.BertConfig arguments
    "bert-base": dict(),  # 12 x 768, 12 heads, vocab 30522: 110M parameters
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096),  # 335M parameters
    "tiny-2": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=64),
    "tiny-4": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=128, max_position_embeddings=64),
}
MESHES = {"dp": dict(data=8), "fsdp": dict(data=1, fsdp=8),
          "fsdp_tp": dict(data=1, fsdp=4, tensor=2)}
NA = "n/a"


# ---- worker side (a fresh process per measurement) ------------------------------------------------
def build(name, scan):
  """(model, task, train config); raises TypeError when the model has no scan_layers keyword."""
  import transformers

  import flaxhf
  from configs.text_classification import get_config
  from flaxhf.data.text_classification import TaskData
  from flaxhf.train import tasks
  cfg = get_config("smoke")
  config = transformers.BertConfig(num_labels=2, **MODELS[name])
  task = tasks.TextClassification(cfg)
  task.configure_model(config, TaskData(train=None, eval=None, label_list=None, num_labels=2,
                                        problem_type="single_label_classification"))
  kw = {"scan_layers": True} if scan else {}
  return flaxhf.FlaxBertForSequenceClassification(config, _do_init=False, **kw), task, cfg


def host_batch(batch, length):
  import numpy as np
  rng = np.random.RandomState(0)
  return {"input_ids": rng.randint(1000, 1024, (batch, length)).astype(np.int32),
          "attention_mask": np.ones((batch, length), np.int32),
          "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.randint(0, 2, (batch,)).astype(np.int32)}


def timing_worker(args):
  import jax
  jax.config.update("jax_compilation_cache_dir", args.cache_dir)  # as launch/run.py sets it
  from flaxhf import sharding
  from flaxhf.train import engine, memory
  try:
    model, task, cfg = build(args.model, args.scan)
  except TypeError as e:
    return {"error": f"{NA} ({str(e)[:120]})"}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  data = host_batch(args.batch, args.length)
  step, state = memory.abstract_train_step(model, task, cfg.train, mesh, "dp")
  if args.execute:  # real weights: the call below then reuses the compile timed here
    tx, _ = engine.optim.make_optimizer(cfg.train, 1000)
    shardings, _ = engine.make_state_shardings(model, tx, mesh, "dp")
    params = model.init_weights(jax.random.key(0), shardings=shardings["params"])
    state = engine.init_state(tx, params, 0, shardings)
    jax.block_until_ready(state)
  batch, out = memory.abstract_batch(mesh, data), {}
  with clock(out, "lower"):
    lowered = step.lower(state, batch)
  with clock(out, "compile"):
    lowered.compile()
  if args.execute:
    batch = jax.device_put(data, batch["input_ids"].sharding)
    for key in ("run1", "run2"):
      with clock(out, key):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    for kind in ("s", "cpu"):
      out[f"first_step_{kind}"] = sum(out[f"{k}_{kind}"] for k in ("lower", "compile", "run1"))
  return out


@contextlib.contextmanager
def clock(out, name):
  """Records wall seconds and this process's CPU seconds (all threads): other jobs inflate wall."""
  t, c = time.perf_counter(), time.process_time()
  yield
  out[f"{name}_s"], out[f"{name}_cpu"] = time.perf_counter() - t, time.process_time() - c


def memory_worker(args):
  import jax
  from flaxhf import sharding
  from flaxhf.train import memory
  assert len(jax.devices()) == 8, jax.devices()
  try:
    model, task, cfg = build(args.model, args.scan)
  except TypeError as e:
    return {"error": f"{NA} ({str(e)[:120]})"}
  data, out = host_batch(args.batch, args.length), {}
  for rules, axes in MESHES.items():
    mesh = sharding.make_mesh(**axes)
    step, state = memory.abstract_train_step(model, task, cfg.train, mesh, rules)
    out[rules] = memory.step_memory(step, state, memory.abstract_batch(mesh, data),
                                    {"xla_backend_optimization_level": 0})
  return out


def worker_main(args):
  try:
    out = (timing_worker if args.worker == "timing" else memory_worker)(args)
  except Exception as e:  # pylint: disable=broad-except
    out = {"error": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  print("RESULT " + json.dumps(out), flush=True)


# ---- driver side ---------------------------------------------------------------------------------
def run_worker(kind, model, scan, args, cache_dir=None, devices=1, execute=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--models", model,
         "--batch", f"{args.batch}x{args.length}"] + (["--scan"] if scan else []) + (
         ["--cache_dir", cache_dir] if cache_dir else []) + (
         ["--execute", model] if kind == "timing" and cache_dir and execute else [])
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"failed (exit {proc.returncode}): {tail[:200]}"}
  return json.loads(lines[-1][len("RESULT "):])


def fmt(r, key, width=11):
  """'wall/cpu' seconds of `key` in a worker's result, or n/a."""
  if f"{key}_s" not in r:
    return f"{NA:>{width}s}"
  return f"{r[key + '_s']:.1f}/{r[key + '_cpu']:.1f}".rjust(width)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default=None, help=f"comma-separated, of {list(MODELS)}")
  p.add_argument("--batch", default=None, help="BATCHxLENGTH (default 8x128; --quick 8x16)")
  p.add_argument("--quick", action="store_true", help="a tiny BERT at 8x16: checks the script quickly")
  p.add_argument("--execute", default=None,
                 help="models whose warm run also executes the step (default bert-base; --quick "
                      "tiny-2); '' for none")
  p.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
  p.add_argument("--scan", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--cache_dir", help=argparse.SUPPRESS)
  args = p.parse_args()
  args.batch, args.length = map(int, (args.batch or ("8x16" if args.quick else "8x128")).split("x"))
  models = (args.models or ("tiny-2" if args.quick else "bert-base,bert-large")).split(",")
  execute = (("tiny-2" if args.quick else "bert-base") if args.execute is None
             else args.execute).split(",")
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    p.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
  if args.worker:
    args.model, args.execute = models[0], bool(args.execute)
    return worker_main(args)

  from benchmarks import machine
  machine.print_header(title="compile_and_memory.py")
  rows = [(m, scan) for m in models for scan in (False, True)]
  label = lambda m, scan: m + (" scan" if scan else "")
  print(f"compile, 1 CPU device, batch {args.batch}x{args.length}; seconds wall/CPU of the process "
        f"(fresh process each; warm = the cold run's persistent cache)")
  print(f"{'model':16s} {'cold lower':>11s} {'compile':>11s} | {'warm lower':>11s} {'compile':>11s} "
        f"{'1st step':>11s} {'step':>11s}", flush=True)
  for m, scan in rows:
    with tempfile.TemporaryDirectory(prefix="flaxhf_xla_") as cache:
      cold = run_worker("timing", m, scan, args, cache)
      warm = cold if "error" in cold else run_worker("timing", m, scan, args, cache,
                                                     execute=m in execute)
    if "error" in cold:
      print(f"{label(m, scan):16s} {cold['error']}", flush=True)
      continue
    print(f"{label(m, scan):16s} {fmt(cold, 'lower')} {fmt(cold, 'compile')} | "
          f"{fmt(warm, 'lower')} {fmt(warm, 'compile')} {fmt(warm, 'first_step')} "
          f"{fmt(warm, 'run2')}", flush=True)
  print()
  print(f"memory per device, MiB, 8 simulated CPU devices, batch {args.batch}x{args.length}: "
        f"params + AdamW state (from shardings) | XLA arguments, temporaries, total")
  print(f"{'model':16s} {'rules':8s} {'params':>8s} {'opt':>8s} {'args':>8s} {'temp':>8s} "
        f"{'total':>8s} {'vs dp':>6s}", flush=True)
  mib = 2.0**20
  for m, scan in rows:
    mem = run_worker("memory", m, scan, args, devices=8)
    if "error" in mem:
      print(f"{label(m, scan):16s} {mem['error']}", flush=True)
      continue
    dp_state = mem["dp"]["params_bytes"] + mem["dp"]["opt_state_bytes"]
    for rules in MESHES:
      r = mem[rules]
      print(f"{label(m, scan):16s} {rules:8s} {r['params_bytes'] / mib:8.1f} "
            f"{r['opt_state_bytes'] / mib:8.1f} {r['argument_bytes'] / mib:8.1f} "
            f"{r['temp_bytes'] / mib:8.1f} {r['total_bytes'] / mib:8.1f} "
            f"{(r['params_bytes'] + r['opt_state_bytes']) / dp_state:6.3f}", flush=True)


if __name__ == "__main__":
  main()
