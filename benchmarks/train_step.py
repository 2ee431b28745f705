"""Train-step throughput: flaxhf vs PyTorch transformers, same model, batch, dtype, in one run.

  python benchmarks/train_step.py [--models bert-base,minilm] [--dtypes float32,bfloat16] [--steps 5]

Prints tokens/s and MFU against a GEMM peak measured here (the best of a JAX and a torch fp32
matmul), for BERT-base (16x128) and MiniLM (32x128). Benchmarks are scripts, never timed tests.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SHAPES = {"bert-base": (16, 128), "minilm": (32, 128)}


def bert_config(name):
  import transformers
  if name == "minilm":
    from configs.common import minilm_path
    return transformers.AutoConfig.from_pretrained(minilm_path(), num_labels=2)
  return transformers.BertConfig(num_labels=2)  # BERT-base: 12 x 768, vocab 30522


def train_flops(config, batch, length):
  """Matmul FLOPs of one forward+backward: 6 x matmul params x tokens + attention scores."""
  d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
  matmul_params = n * (4 * d * d + 2 * d * f) + d * d + 2 * d  # layers + pooler + classifier
  tokens = batch * length
  attention = n * 2 * 2 * length * d * tokens  # QK^T and PV
  return 3 * (2 * matmul_params * tokens + attention)


def gemm_peak(n=2048, reps=10, dtype="float32"):
  """Best matmul FLOP/s of JAX and torch on this machine: (best, jax, torch)."""
  import jax
  import jax.numpy as jnp
  import torch
  a = jnp.ones((n, n), getattr(jnp, dtype))
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  jax_peak = 2 * n**3 * reps / (time.perf_counter() - t)
  b = torch.ones(n, n, dtype=getattr(torch, dtype))
  b @ b
  t = time.perf_counter()
  for _ in range(reps):
    b @ b
  torch_peak = 2 * n**3 * reps / (time.perf_counter() - t)
  return max(jax_peak, torch_peak), jax_peak, torch_peak


def flaxhf_step_time(config, batch, length, dtype, steps):
  import jax
  import jax.numpy as jnp
  from configs.text_classification import get_config
  from flaxhf.models.auto import FlaxAutoModelForSequenceClassification
  from flaxhf.train import engine, tasks
  from flaxhf.data.text_classification import TaskData
  cfg = get_config("smoke")
  model = FlaxAutoModelForSequenceClassification.from_config(
      config, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
  task = tasks.TextClassification(cfg)
  task.configure_model(config, TaskData(train=None, eval=None, label_list=None, num_labels=2,
                                        problem_type="single_label_classification"))
  state, step = engine.make_train_step(model, task, cfg.train, 1000)
  rng = np.random.RandomState(0)
  data = {"input_ids": rng.randint(1000, 30000, (batch, length)).astype(np.int32),
          "attention_mask": np.ones((batch, length), np.int32),
          "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.randint(0, 2, (batch,)).astype(np.int32)}
  data = jax.device_put(data)
  state, m = step(state, data)  # compile
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, data)
  jax.block_until_ready(m)
  elapsed = time.perf_counter() - t
  if getattr(step, "_cache_size", lambda: 1)() != 1:
    print("warning: the train step compiled more than once; the timing includes a compile")
  return elapsed / steps


def torch_step_time(config, batch, length, dtype, steps):
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  rng = np.random.RandomState(0)
  inputs = {"input_ids": torch.tensor(rng.randint(1000, 30000, (batch, length))),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
            "labels": torch.tensor(rng.randint(0, 2, (batch,)))}

  def one():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return (time.perf_counter() - t) / steps


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="bert-base,minilm")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--skip_torch", action="store_true")
  args = p.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  peak, jax_peak, torch_peak = gemm_peak()
  print(f"GEMM peak fp32: {peak / 1e9:.1f} GFLOP/s (jax {jax_peak / 1e9:.1f}, torch "
        f"{torch_peak / 1e9:.1f}); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  if "bfloat16" in args.dtypes:  # what each library's bf16 matmul reaches (MFU stays vs fp32)
    _, jax_bf16, torch_bf16 = gemm_peak(dtype="bfloat16")
    print(f"GEMM bf16: jax {jax_bf16 / 1e9:.1f}, torch {torch_bf16 / 1e9:.1f} GFLOP/s")
  print(f"{'model':10s} {'dtype':9s} {'B x L':8s} {'flaxhf tok/s':>13s} {'MFU':>6s} "
        f"{'torch tok/s':>12s} {'MFU':>6s} {'flaxhf/torch':>12s}")
  for name in args.models.split(","):
    batch, length = SHAPES[name]
    config = bert_config(name)
    flops = train_flops(config, batch, length)
    for dtype in args.dtypes.split(","):
      tf = flaxhf_step_time(config, batch, length, dtype, args.steps)
      tt = float("nan") if args.skip_torch else torch_step_time(config, batch, length, dtype,
                                                                args.steps)
      tok = batch * length
      print(f"{name:10s} {dtype:9s} {batch}x{length:<5d} {tok / tf:13.0f} {flops / tf / peak:6.1%} "
            f"{tok / tt:12.0f} {flops / tt / peak:6.1%} {tt / tf:12.2f}", flush=True)


if __name__ == "__main__":
  main()
