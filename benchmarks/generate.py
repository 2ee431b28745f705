"""Decode throughput: flaxhf `model.generate` vs transformers PyTorch `generate`, same weights, one run.

  python benchmarks/generate.py [--model gpt2|smollm|marian|t5|bart[,...]] [--size small|tiny]
      [--cases b1-greedy,b8-greedy,b1-beam4,b8-beam4] [--prompt_len 32] [--new_tokens N]
      [--reps 2] [--breakdown] [--memory [both|flaxhf]]

Models, random weights, fp32 (`--size small`; `--size tiny`, 2 layers x 64 and vocab 1000, checks
each model in seconds):
  gpt2    GPT-2 small (GPT2Config() defaults: 12 x 768, vocab 50257, 124M parameters); 128 new
          tokens.
  smollm  a Llama at SmolLM-135M's shape (30 x 576, 9 query / 3 KV heads, MLP 1536, vocab 49152,
          tied embeddings); 128 new tokens.
  marian  opus-mt-en-de's shape: 6+6 layers x 512, 8 heads, ffn 2048, vocab 58101, swish, static
          sinusoidal positions, scaled embeddings shared by encoder, decoder and LM head, decoder
          start = pad; default case b32-beam4; 64 new tokens.
  t5      T5-small (T5Config() defaults: 6+6 x 512, 8 heads, d_ff 2048, vocab 32128); 64 new tokens.
  bart    BART-base (BartConfig() defaults: 6+6 x 768, 12 heads, vocab 50265); 64 new tokens.
PyTorch draws the weights; flaxhf loads them from its save_pretrained folder. Both generate from the
same random `--prompt_len`-token prompts (no padding; an encoder-decoder's source, decoding from its
start token) with EOS (and forced EOS) switched off, so every row gets exactly `--new_tokens`
tokens; the script checks that and prints whether the token ids are identical. A case is
bB-greedy or bB-beamK (batch B, K beams).
tok/s = batch x new tokens / seconds of one steady-state `generate` call (prefill and encoder
included; for beam search, tokens of the returned sequence per prompt). flaxhf compile s = first
call minus a steady-state call (one program per case). `--breakdown` (GPT-2) adds flaxhf's prefill
and one decode step timed alone (and torch's one cached forward), to show where the time goes.
`--memory` prints, instead of timings, the peak memory of each beam case bB-beamK against greedy at
batch K x B (the same number of sequences): for flaxhf the compiled decode program's XLA memory
analysis (arguments, i.e. weights and inputs, + outputs + temporaries: what the program needs
live), for PyTorch (unless `--memory flaxhf`) the peak RSS growth of one `generate` call in a fresh
process (weights already loaded and touched by a warm-up call; includes allocator slack).
"""

import argparse
import copy
import multiprocessing
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402

# (PyTorch class, flaxhf class, default cases, default new tokens) per model.
MODELS = {
    "gpt2": ("GPT2LMHeadModel", "FlaxGPT2LMHeadModel", "b1-greedy,b8-greedy,b1-beam4,b8-beam4",
             128),
    "smollm": ("LlamaForCausalLM", "FlaxLlamaForCausalLM", "b1-greedy,b8-greedy,b1-beam4,b8-beam4",
               128),
    "marian": ("MarianMTModel", "FlaxMarianMTModel", "b32-beam4", 64),
    "t5": ("T5ForConditionalGeneration", "FlaxT5ForConditionalGeneration",
           "b1-greedy,b8-greedy,b1-beam4,b8-beam4", 64),
    "bart": ("BartForConditionalGeneration", "FlaxBartForConditionalGeneration",
             "b1-greedy,b8-greedy,b1-beam4,b8-beam4", 64),
}
CASE = re.compile(r"b(\d+)-(greedy|beam(\d+))$")


def parse_case(case):
  """(batch, beams) of a case name such as b8-greedy or b32-beam4."""
  m = CASE.match(case)
  if not m or int(m.group(1)) < 1 or (m.group(3) and int(m.group(3)) < 2):
    raise ValueError(f"case {case!r}: write bB-greedy or bB-beamK (batch B >= 1, K >= 2 beams), "
                     "e.g. b8-greedy,b32-beam4.")
  return int(m.group(1)), int(m.group(3) or 1)


def model_config(name, size):
  """The transformers config of `name` at `size` (small: the published shape; tiny: seconds)."""
  import transformers
  tiny = size == "tiny"
  if name == "gpt2":
    if tiny:
      return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000,
                                     n_positions=256, bos_token_id=999, eos_token_id=999)
    return transformers.GPT2Config()
  if name == "smollm":
    from benchmarks.train_step import smollm_config
    config = smollm_config()
    if tiny:
      config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    return config
  if name == "marian":  # Helsinki-NLP/opus-mt-en-de's config.json, special ids included
    d, n, h, f, v = (64, 2, 2, 128, 1000) if tiny else (512, 6, 8, 2048, 58101)
    return transformers.MarianConfig(
        vocab_size=v, decoder_vocab_size=v, d_model=d, encoder_layers=n, decoder_layers=n,
        encoder_attention_heads=h, decoder_attention_heads=h, encoder_ffn_dim=f,
        decoder_ffn_dim=f, max_position_embeddings=512, activation_function="swish",
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=v - 1, decoder_start_token_id=v - 1, eos_token_id=0, forced_eos_token_id=0)
  if name == "t5":
    if tiny:
      return transformers.T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=2, num_layers=2,
                                   vocab_size=1000)
    return transformers.T5Config()
  if tiny:
    return transformers.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                   encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=1000,
                                   max_position_embeddings=256)
  return transformers.BartConfig()


def describe(name, config, size):
  if name == "gpt2":
    return (f"GPT-2 {size}: {config.n_layer} x {config.n_embd}, {config.n_head} heads, vocab "
            f"{config.vocab_size}")
  if name == "smollm":
    return (f"Llama at SmolLM-135M's shape ({size}): {config.num_hidden_layers} x "
            f"{config.hidden_size}, {config.num_attention_heads} / {config.num_key_value_heads} "
            f"KV heads, MLP {config.intermediate_size}, vocab {config.vocab_size}")
  if name == "t5":
    return (f"T5 {size}: {config.num_layers}+{config.num_decoder_layers} x {config.d_model}, "
            f"{config.num_heads} heads, d_ff {config.d_ff}, vocab {config.vocab_size}")
  label = {"marian": "Marian (opus-mt-en-de shape)", "bart": "BART-base"}[name]
  return (f"{label if size == 'small' else name + ' tiny'}: {config.encoder_layers}+"
          f"{config.decoder_layers} x {config.d_model}, {config.encoder_attention_heads} heads, "
          f"ffn {config.encoder_ffn_dim}, vocab {config.vocab_size}")


def eos_off(model, config):
  """EOS (and forced EOS/BOS) off: every row runs to exactly max_new_tokens."""
  g = model.generation_config
  g.eos_token_id = None
  for key in ("forced_eos_token_id", "forced_bos_token_id"):
    if getattr(g, key, None) is not None:
      setattr(g, key, None)
  if config.is_encoder_decoder:  # decoding starts from the family's start token (T5, Marian: pad)
    g.decoder_start_token_id = getattr(config, "decoder_start_token_id", None)
    if g.decoder_start_token_id is None:
      g.decoder_start_token_id = config.pad_token_id
  else:
    g.pad_token_id = None
    g.bos_token_id = None


def build_models(name, config, workdir):
  """(torch model, flaxhf model) of `name` holding the same random weights."""
  import torch
  import transformers
  import flaxhf
  transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar
  torch_cls, flax_cls = MODELS[name][:2]
  torch.manual_seed(0)
  pt = getattr(transformers, torch_cls)(config).eval()
  pt.save_pretrained(workdir)
  fx = getattr(flaxhf, flax_cls).from_pretrained(workdir)
  for model in (pt, fx):
    eos_off(model, config)
  return pt, fx


def settings(num_beams, new_tokens):
  kw = dict(max_new_tokens=new_tokens, num_beams=num_beams, do_sample=False)
  return {**kw, "early_stopping": False} if num_beams > 1 else kw


def prompts(rng, name, config, batch, length):
  """Random prompt ids; an encoder-decoder's avoid the low special ids and the last one (Marian's
  pad), so no source token is read as padding."""
  if not config.is_encoder_decoder:
    return rng.randint(0, config.vocab_size, (batch, length)).astype(np.int32)
  return rng.randint(3, config.vocab_size - 1, (batch, length)).astype(np.int32)


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
  one cached forward, for this case's batch x beams rows (decoder-only models)."""
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


def run_timing(name, config, pt, fx, cases, args, rng):
  print(f"{'case':12s} {'flaxhf tok/s':>12s} {'torch tok/s':>11s} {'ratio':>6s} "
        f"{'flaxhf compile s':>16s} {'new tokens':>10s} {'same ids':>8s}", flush=True)
  for case in cases:
    batch, beams = parse_case(case)
    ids = prompts(rng, name, config, batch, args.prompt_len)
    # The returned sequences start with the decoder prompt: the source itself, or the start token.
    start = 1 if config.is_encoder_decoder else args.prompt_len
    f_first, f_s, f_seq = time_flaxhf(fx, ids, beams, args.new_tokens, args.reps)
    _, t_s, t_seq = time_torch(pt, ids, beams, args.new_tokens, args.reps)
    new = {f_seq.shape[1] - start, t_seq.shape[1] - start}
    if new != {args.new_tokens}:
      raise SystemExit(f"{case}: flaxhf made {f_seq.shape[1] - start} and torch "
                       f"{t_seq.shape[1] - start} new tokens, not {args.new_tokens}")
    same = f_seq.shape == t_seq.shape and bool((f_seq == t_seq).all())
    tokens = batch * args.new_tokens
    print(f"{case:12s} {tokens / f_s:12.1f} {tokens / t_s:11.1f} {t_s / f_s:6.2f} "
          f"{f_first - f_s:16.1f} {args.new_tokens:10d} {str(same):>8s}", flush=True)
    if args.breakdown:
      fp, fs, tp, ts = breakdown(pt, fx, ids, beams, args.new_tokens)
      print(f"{'':12s} prefill ms flaxhf {fp * 1e3:.1f} torch {tp * 1e3:.1f}; one decode step "
            f"ms flaxhf {fs * 1e3:.2f} torch {ts * 1e3:.2f}; steady call / new tokens ms "
            f"flaxhf {f_s / args.new_tokens * 1e3:.2f} torch {t_s / args.new_tokens * 1e3:.2f}",
            flush=True)


# ---- memory --------------------------------------------------------------------------------------
def flaxhf_memory(fx, ids, beams, new_tokens):
  """(argument, output, temp) bytes of the compiled decode program for this call."""
  stats = fx.lower_generate(ids, attention_mask=np.ones_like(ids),
                            **settings(beams, new_tokens)).compile().memory_analysis()
  return stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes


def _status_kb(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise OSError(f"no {field} in /proc/self/status")


def _torch_peak_rss(name, model_dir, ids, beams, new_tokens, threads, queue):
  """In a fresh process: the peak RSS growth (bytes) of one torch `generate` call."""
  import torch
  import transformers
  torch.set_num_threads(threads)
  transformers.utils.logging.disable_progress_bar()
  model = getattr(transformers, MODELS[name][0]).from_pretrained(model_dir).eval()
  eos_off(model, model.config)
  x = torch.tensor(ids, dtype=torch.long)
  with torch.inference_mode():
    # Touches every weight and warms oneDNN up, so the peak below is the call's own memory.
    model.generate(x[:1], attention_mask=torch.ones_like(x[:1]), **settings(1, 1))
    rss = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    model.generate(x, attention_mask=torch.ones_like(x), **settings(beams, new_tokens))
  queue.put((_status_kb("VmHWM") - rss) * 1024)


def torch_memory(name, model_dir, ids, beams, new_tokens):
  ctx = multiprocessing.get_context("spawn")  # a fresh allocator and high-water mark per call
  queue = ctx.Queue()
  proc = ctx.Process(target=_torch_peak_rss, args=(name, model_dir, ids, beams, new_tokens,
                                                    len(os.sched_getaffinity(0)), queue))
  proc.start()
  result = queue.get()
  proc.join()
  return result


def run_memory(name, config, fx, cases, args, rng, workdir):
  beam_cases = [c for c in cases if parse_case(c)[1] > 1]
  if not beam_cases:
    raise SystemExit(f"--memory compares beam cases with greedy ones; --cases {cases} has no "
                     "bB-beamK case")
  mb = 1 / 2**20
  print(f"peak memory, MiB: beam K at batch B vs greedy at batch K x B (the same sequences), "
        f"{args.new_tokens} new tokens; flaxhf = XLA memory analysis of the compiled program "
        f"(args + outputs + temps); torch = peak RSS growth of one call")
  print(f"{'case':12s} {'flaxhf args':>11s} {'outputs':>8s} {'temps':>8s} {'total':>8s} "
        f"{'torch RSS':>10s}", flush=True)
  for case in beam_cases:
    batch, beams = parse_case(case)
    ids = prompts(rng, name, config, batch, args.prompt_len)
    for label, rows, k in ((case, ids, beams),
                           (f"b{batch * beams}-greedy", np.repeat(ids, beams, axis=0), 1)):
      a, o, t = flaxhf_memory(fx, rows, k, args.new_tokens)
      pt = (f"{torch_memory(name, workdir, rows, k, args.new_tokens) * mb:10.1f}"
            if args.memory == "both" else f"{'-':>10s}")
      print(f"{label:12s} {a * mb:11.1f} {o * mb:8.1f} {t * mb:8.1f} {(a + o + t) * mb:8.1f} "
            f"{pt}", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="gpt2", help=f"comma-separated, of {list(MODELS)}")
  p.add_argument("--size", choices=["small", "tiny"], default="small")
  p.add_argument("--cases", default=None,
                 help="comma-separated bB-greedy / bB-beamK; default per model: " +
                 "; ".join(f"{m} {v[2]}" for m, v in MODELS.items()))
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=None,
                 help="default: gpt2 128, the encoder-decoders 64")
  p.add_argument("--reps", type=int, default=2, help="steady-state calls per side (best is kept)")
  p.add_argument("--breakdown", action="store_true", help="gpt2 only")
  p.add_argument("--memory", nargs="?", const="both", choices=["both", "flaxhf"], default=None,
                 help="the peak-memory report instead of timings (flaxhf: no torch side)")
  args = p.parse_args()
  names = args.model.split(",")
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    p.error(f"unknown --model {unknown}; choose from {list(MODELS)}")
  if args.breakdown and names != ["gpt2"]:
    p.error("--breakdown times the decoder-only prefill and step: use it with --model gpt2")
  for case in (args.cases or "").split(",") if args.cases else []:
    try:
      parse_case(case)
    except ValueError as e:
      p.error(str(e))
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  machine.print_header(title="generate.py")
  for name in names:
    cases = (args.cases or MODELS[name][2]).split(",")
    model_args = copy.copy(args)
    model_args.new_tokens = args.new_tokens or MODELS[name][3]
    config = model_config(name, args.size)
    print(f"{describe(name, config, args.size)}; fp32, random weights; prompts {args.prompt_len} "
          f"tokens, {model_args.new_tokens} new tokens, EOS off"
          + ("" if args.memory else f"; best of {args.reps} steady-state calls"), flush=True)
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as workdir:
      pt, fx = build_models(name, config, workdir)
      if args.memory:
        del pt  # the torch side loads its own copy in a fresh process
        run_memory(name, config, fx, cases, model_args, rng, workdir)
      else:
        run_timing(name, config, pt, fx, cases, model_args, rng)
    print(flush=True)


if __name__ == "__main__":
  main()
