"""Decode throughput: flaxhf `model.generate` vs transformers PyTorch `generate`, same weights, one run.

  python benchmarks/generate.py [--size small|tiny] [--cases b1-greedy,b8-greedy,b1-beam4,b8-beam4]
      [--prompt_len 32] [--new_tokens 128] [--reps 2] [--breakdown]

GPT-2 small (GPT2Config() defaults: 12 x 768, vocab 50257, 124M parameters), random weights, fp32.
PyTorch draws the weights; flaxhf loads them from its save_pretrained folder. Both generate from the
same random 32-token prompts (no padding) with EOS switched off, so every row gets exactly
`--new_tokens` tokens; the script checks that and prints whether the token ids are identical.
tok/s = batch x new tokens / seconds of one steady-state `generate` call (prefill included; for
beam search, tokens of the returned sequence per prompt). flaxhf compile s = first call minus a
steady-state call (one program per case). `--breakdown` adds flaxhf's prefill and one decode step
timed alone (and torch's one cached forward), to show where the time goes. `--size tiny` (2 x 64,
vocab 1000) checks the script in seconds.
"""

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402

CASES = {"b1-greedy": (1, 1), "b8-greedy": (8, 1), "b1-beam4": (1, 4), "b8-beam4": (8, 4)}


def gpt2_config(size):
  from transformers import GPT2Config
  if size == "tiny":
    return GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=256,
                      bos_token_id=999, eos_token_id=999)
  return GPT2Config()


def build_models(config, workdir):
  """(torch GPT2LMHeadModel, flaxhf FlaxGPT2LMHeadModel) holding the same random weights."""
  import torch
  import transformers
  from flaxhf import FlaxGPT2LMHeadModel
  torch.manual_seed(0)
  pt = transformers.GPT2LMHeadModel(config).eval()
  pt.save_pretrained(workdir)
  fx = FlaxGPT2LMHeadModel.from_pretrained(workdir)
  # EOS off on both sides: every row runs to exactly max_new_tokens.
  for model in (pt, fx):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = None
  return pt, fx


def settings(num_beams, new_tokens):
  kw = dict(max_new_tokens=new_tokens, num_beams=num_beams, do_sample=False)
  return {**kw, "early_stopping": False} if num_beams > 1 else kw


def time_flaxhf(model, ids, num_beams, new_tokens, reps):
  """(first-call s, best steady-state s, sequences)."""
  import jax
  kw = settings(num_beams, new_tokens)
  t = time.perf_counter()
  out = jax.block_until_ready(model.generate(ids, attention_mask=np.ones_like(ids), **kw).sequences)
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = jax.block_until_ready(model.generate(ids, attention_mask=np.ones_like(ids),
                                               **kw).sequences)
    times.append(time.perf_counter() - t)
  return first, min(times), np.asarray(out)


def time_torch(model, ids, num_beams, new_tokens, reps):
  """(first-call s, best steady-state s, sequences)."""
  import torch
  kw = settings(num_beams, new_tokens)
  x = torch.tensor(ids, dtype=torch.long)
  times = []
  with torch.inference_mode():
    for _ in range(reps + 1):  # the first call warms up oneDNN/MKL and the allocator
      t = time.perf_counter()
      out = model.generate(x, attention_mask=torch.ones_like(x), **kw)
      times.append(time.perf_counter() - t)
  return times[0], min(times[1:]), out.numpy()


def breakdown(pt, fx, ids, num_beams, new_tokens, reps=3):
  """Seconds of flaxhf's prefill and of one cached decode step, each jitted alone, and of torch's
  one cached forward, for this case's batch x beams rows."""
  import jax
  import jax.numpy as jnp
  import torch
  rows = np.repeat(ids, num_beams, axis=0)
  n, p = rows.shape
  cache_len = p + new_tokens
  prefill = jax.jit(lambda params, x, m: fx._generation_prefill(params, x, m, cache_len, {}))
  step = jax.jit(lambda params, tok, state: fx._generation_step(params, tok, state))

  def best(f):
    jax.block_until_ready(f())
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f())
      ts.append(time.perf_counter() - t)
    return min(ts)

  ids_j, mask_j = jnp.asarray(rows), jnp.ones_like(jnp.asarray(rows))
  logits, state = prefill(fx.params, ids_j, mask_j)
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  fx_prefill = best(lambda: prefill(fx.params, ids_j, mask_j))
  fx_step = best(lambda: step(fx.params, tok, state))
  x = torch.tensor(rows, dtype=torch.long)
  with torch.inference_mode():
    out = pt(x, use_cache=True, logits_to_keep=1)  # as generate's prefill: last position's logits
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.ones(n, p + 1, dtype=torch.long)

    def one():  # the cache grows in place: each forward starts from a copy of the prompt cache
      cache = copy.deepcopy(out.cache)
      t = time.perf_counter()
      pt(nxt, cache=cache, attention_mask=mask, use_cache=True)
      return time.perf_counter() - t

    one()
    pt_step = min(one() for _ in range(reps))
    ts = []
    for _ in range(reps):
      t = time.perf_counter()
      pt(x, use_cache=True, logits_to_keep=1)
      ts.append(time.perf_counter() - t)
    pt_prefill = min(ts)
  return fx_prefill, fx_step, pt_prefill, pt_step


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", choices=["small", "tiny"], default="small")
  p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {list(CASES)}")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--reps", type=int, default=2, help="steady-state calls per side (best is kept)")
  p.add_argument("--breakdown", action="store_true")
  args = p.parse_args()
  cases = args.cases.split(",")
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    p.error(f"unknown --cases {unknown}; choose from {list(CASES)}")
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  machine.print_header(title="generate.py")
  config = gpt2_config(args.size)
  print(f"GPT-2 {args.size}: {config.n_layer} x {config.n_embd}, {config.n_head} heads, vocab "
        f"{config.vocab_size}, fp32, random weights; prompts {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens, EOS off; best of {args.reps} steady-state calls")
  rng = np.random.RandomState(0)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    pt, fx = build_models(config, workdir)
    print(f"{'case':10s} {'flaxhf tok/s':>12s} {'torch tok/s':>11s} {'ratio':>6s} "
          f"{'flaxhf compile s':>16s} {'new tokens':>10s} {'same ids':>8s}", flush=True)
    for case in cases:
      batch, beams = CASES[case]
      ids = rng.randint(0, config.vocab_size, (batch, args.prompt_len)).astype(np.int32)
      f_first, f_s, f_seq = time_flaxhf(fx, ids, beams, args.new_tokens, args.reps)
      _, t_s, t_seq = time_torch(pt, ids, beams, args.new_tokens, args.reps)
      new = {f_seq.shape[1] - args.prompt_len, t_seq.shape[1] - args.prompt_len}
      if new != {args.new_tokens}:
        raise SystemExit(f"{case}: flaxhf made {f_seq.shape[1] - args.prompt_len} and torch "
                         f"{t_seq.shape[1] - args.prompt_len} new tokens, not {args.new_tokens}")
      same = f_seq.shape == t_seq.shape and bool((f_seq == t_seq).all())
      tokens = batch * args.new_tokens
      rows.append((case, tokens / f_s, tokens / t_s))
      print(f"{case:10s} {tokens / f_s:12.1f} {tokens / t_s:11.1f} {t_s / f_s:6.2f} "
            f"{f_first - f_s:16.1f} {args.new_tokens:10d} {str(same):>8s}", flush=True)
      if args.breakdown:
        fp, fs, tp, ts = breakdown(pt, fx, ids, beams, args.new_tokens)
        print(f"{'':10s} prefill ms flaxhf {fp * 1e3:.1f} torch {tp * 1e3:.1f}; one decode step "
              f"ms flaxhf {fs * 1e3:.2f} torch {ts * 1e3:.2f}; steady call / new tokens ms "
              f"flaxhf {f_s / args.new_tokens * 1e3:.2f} torch {t_s / args.new_tokens * 1e3:.2f}",
              flush=True)


if __name__ == "__main__":
  main()
