"""End-to-end MiniLM fine-tune on SST-2: flaxhf's engine vs a careful PyTorch loop, same run.

  python benchmarks/finetune_sst2.py [--steps 300] [--batch_size 32] [--lr 5e-5] [--dtype float32]
      [--seeds 42,43,44]

Both sides: the same checkpoint, train/dev files, steps, global batch, learning rate, linear
warmup/decay, AdamW without decay on biases/LayerNorm, gradient clipping 1.0, max length 128.
PyTorch pads each batch to its longest example (dynamic padding); flaxhf pads to length buckets.
Prints the machine header (benchmarks/machine.py), then wall clock (training loop, and end to
end with data and compilation) and dev accuracy, per seed and, with several seeds, their mean and
standard deviation: on 872 dev sentences one seed's accuracy moves by about a point, so compare
means.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402


def glue_files(data_dir):
  folder = os.path.join(data_dir, "text_classification", "glue", "SST-2")
  return os.path.join(folder, "train.tsv"), os.path.join(folder, "dev.tsv")


def run_flaxhf(args, seed, model_path, train_file, dev_file):
  import jax
  from configs.text_classification import get_config
  from flaxhf.train import engine
  cfg = get_config("sst2,local")
  cfg.model.name_or_path = model_path
  cfg.model.dtype = args.dtype
  cfg.data.train_file, cfg.data.validation_file = train_file, dev_file
  cfg.data.max_length = 128
  cfg.data.group_by_length = args.group_by_length
  cfg.train.steps, cfg.train.batch_size = args.steps, args.batch_size
  cfg.train.learning_rate, cfg.train.warmup_ratio = args.lr, 0.1
  cfg.train.seed = seed
  cfg.train.eval_every, cfg.train.log_every, cfg.train.progress_bar = 0, 50, False
  cfg.checkpoint.every_steps = args.steps  # one checkpoint at the end, like saving the model
  cfg.mesh.data = 1
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    trainer = engine.Trainer(cfg, workdir, devices=jax.devices()[:1])
    t1 = time.perf_counter()
    results = trainer.fit()
    trainer.ckpt.close()
  t2 = time.perf_counter()
  return {"train_s": t2 - t1, "total_s": t2 - t0, "accuracy": results["accuracy"]}


def run_torch(args, seed, model_path, train_file, dev_file):
  import torch
  import transformers
  from flaxhf.data.sources import read_file
  torch.manual_seed(seed)
  t0 = time.perf_counter()
  tok = transformers.AutoTokenizer.from_pretrained(model_path)
  train, dev = read_file(train_file), read_file(dev_file)
  enc = tok(list(train["sentence"]), truncation=True, max_length=128)["input_ids"]
  dev_enc = tok(list(dev["sentence"]), truncation=True, max_length=128)["input_ids"]
  y, dev_y = np.array(train["label"]), np.array(dev["label"])
  model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
  decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
  sched = transformers.get_linear_schedule_with_warmup(opt, int(0.1 * args.steps), args.steps)

  def collate(ids):  # dynamic padding: pad to the longest in the batch
    n = max(map(len, ids))
    x = torch.zeros(len(ids), n, dtype=torch.long)
    m = torch.zeros(len(ids), n, dtype=torch.long)
    for i, row in enumerate(ids):
      x[i, :len(row)], m[i, :len(row)] = torch.tensor(row), 1
    return x, m

  rng = np.random.default_rng(seed)
  order = rng.permutation(len(enc))
  model.train()
  t1 = time.perf_counter()
  for step in range(args.steps):
    idx = order[(step * args.batch_size) % len(order):][:args.batch_size]
    x, m = collate([enc[i] for i in idx])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
      loss = model(input_ids=x, attention_mask=m, labels=torch.tensor(y[idx])).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
  model.eval()
  preds = []
  with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
    for i in range(0, len(dev_enc), 64):
      x, m = collate(dev_enc[i:i + 64])
      preds.append(model(input_ids=x, attention_mask=m).logits.float().argmax(-1).numpy())
  t2 = time.perf_counter()
  return {"train_s": t2 - t1, "total_s": t2 - t0,
          "accuracy": float((np.concatenate(preds) == dev_y).mean())}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--lr", type=float, default=5e-5)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--seeds", default="42", help="comma-separated; each seed runs both sides")
  p.add_argument("--group_by_length", action="store_true")
  p.add_argument("--only", choices=["flaxhf", "torch"], default=None)
  args = p.parse_args()
  import torch
  from configs.common import DATA_DIR, minilm_path
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  machine.print_header(tuple(dict.fromkeys(["float32", args.dtype])), title="finetune_sst2.py")
  model_path = minilm_path()
  train_file, dev_file = glue_files(os.environ.get("FLAXHF_DATA", DATA_DIR))
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = {"flaxhf": [], "pytorch": []}
  for seed in seeds:
    if args.only != "torch":
      rows["flaxhf"].append(run_flaxhf(args, seed, model_path, train_file, dev_file))
      print(f"seed {seed} flaxhf: {rows['flaxhf'][-1]}", flush=True)
    if args.only != "flaxhf":
      rows["pytorch"].append(run_torch(args, seed, model_path, train_file, dev_file))
      print(f"seed {seed} pytorch: {rows['pytorch'][-1]}", flush=True)
  print(f"MiniLM SST-2, {args.steps} steps x {args.batch_size}, lr {args.lr}, {args.dtype}"
        f"{', group_by_length' if args.group_by_length else ''}, seeds {seeds}")
  print(f"{'':8s} {'seed':>5s} {'train+eval s':>12s} {'end-to-end s':>12s} {'dev acc':>8s}")
  for name, runs in rows.items():
    for seed, r in zip(seeds, runs):
      print(f"{name:8s} {seed:5d} {r['train_s']:12.1f} {r['total_s']:12.1f} {r['accuracy']:8.4f}")
    if len(runs) > 1:
      mean = {k: np.mean([r[k] for r in runs]) for k in runs[0]}
      std = np.std([r["accuracy"] for r in runs], ddof=1)
      print(f"{name:8s} {'mean':>5s} {mean['train_s']:12.1f} {mean['total_s']:12.1f} "
            f"{mean['accuracy']:8.4f} +- {std:.4f}")


if __name__ == "__main__":
  main()
