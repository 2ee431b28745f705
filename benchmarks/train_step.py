"""Train-step throughput: flaxhf vs PyTorch transformers, same model, batch, dtype, in one run.

  python benchmarks/train_step.py [--models bert-base,minilm,gpt2,t5-small,bart-base,smollm]
      [--dtypes float32,bfloat16] [--steps 5] [--skip_torch]

Prints the machine header (benchmarks/machine.py: CPU, cores, flags, versions, GEMM peaks), then
tokens/s and MFU against the GEMM peak measured here (the best of a JAX and a torch fp32 matmul),
for BERT-base (16x128, sequence classification), MiniLM (32x128), GPT-2 small (8x256, causal LM
loss), a Llama at SmolLM-135M's shape (`smollm`: 30 layers x 576, 9 query / 3 KV heads, MLP 1536,
vocab 49152, tied embeddings; random weights; 8x256, causal LM loss), and T5-small / BART-base (16 x 128 source + 32 target tokens, conditional generation with
labels; tok/s counts source and target tokens). Both sides: AdamW, gradient clipping 1.0, the same
batch every step. The flaxhf step is the engine's (engine.make_train_step with the task a user
trains: CausalLM, TextClassification, or the seq2seq Translation task, which shifts the labels
into decoder inputs on device); PyTorch runs a plain loop on transformers' own loss (which shifts
the labels too). Default models: bert-base,minilm,gpt2. Benchmarks are scripts, never timed tests.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402

SHAPES = {"bert-base": (16, 128), "minilm": (32, 128), "gpt2": (8, 256), "t5-small": (16, 128),
          "bart-base": (16, 128), "smollm": (8, 256)}
CAUSAL = ("gpt2", "smollm")  # causal LM loss on the input ids
TARGET_LEN = {"t5-small": 32, "bart-base": 32}  # the encoder-decoders' label length
TORCH_CLASS = {"gpt2": "GPT2LMHeadModel", "t5-small": "T5ForConditionalGeneration",
               "bart-base": "BartForConditionalGeneration", "smollm": "LlamaForCausalLM"}


def smollm_config():
  """SmolLM-135M's config.json (HuggingFaceTB/SmolLM-135M): a Llama of 30 x 576."""
  import transformers
  return transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
      bos_token_id=0, eos_token_id=0, pad_token_id=0)


def model_config(name):
  import transformers
  if name == "minilm":
    from configs.common import minilm_path
    return transformers.AutoConfig.from_pretrained(minilm_path(), num_labels=2)
  if name == "gpt2":
    return transformers.GPT2Config()  # GPT-2 small: 12 x 768, vocab 50257, 124M params
  if name == "smollm":
    return smollm_config()
  if name == "t5-small":
    # 6+6 x 512, 8 heads, d_ff 2048, vocab 32128, 60M params; decoding starts from pad, as
    # t5-small's config.json says (T5Config itself leaves the start id unset).
    return transformers.T5Config(decoder_start_token_id=0)
  if name == "bart-base":
    return transformers.BartConfig()  # 6+6 x 768, 12 heads, ffn 3072, vocab 50265, 139M params
  return transformers.BertConfig(num_labels=2)  # BERT-base: 12 x 768, vocab 30522


def train_flops(name, config, batch, length):
  """Matmul FLOPs of one forward+backward: 6 x matmul params x tokens + attention scores."""
  if name in TARGET_LEN:
    return seq2seq_flops(config, batch, length, TARGET_LEN[name])
  tokens = batch * length
  if name == "gpt2":
    d, n = config.n_embd, config.n_layer
    f = config.n_inner or 4 * d
    matmul_params = n * (4 * d * d + 2 * d * f) + d * config.vocab_size  # layers + tied LM head
  elif name == "smollm":  # GQA: k and v project to the KV heads only; a gated MLP of three
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    matmul_params = n * (2 * d * d + 2 * d * kv + 3 * d * f) + d * config.vocab_size
  else:
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    matmul_params = n * (4 * d * d + 2 * d * f) + d * d + 2 * d  # layers + pooler + classifier
  attention = n * 2 * 2 * length * d * tokens  # QK^T and PV (both sides compute the full square)
  return 3 * (2 * matmul_params * tokens + attention)


def seq2seq_flops(config, batch, src, tgt):
  """As train_flops for an encoder-decoder: the encoder on source tokens; the decoder's self-
  attention, cross-attention queries/outputs, MLP and LM head on target tokens; its cross-attention
  keys/values on source tokens."""
  if config.model_type == "t5":
    d, f, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    n_enc, n_dec = config.num_layers, config.num_decoder_layers
    mlp = (3 if config.is_gated_act else 2) * d * f
  else:
    d, f, inner = config.d_model, config.encoder_ffn_dim, config.d_model
    n_enc, n_dec = config.encoder_layers, config.decoder_layers
    mlp = 2 * d * f
  s_tok, t_tok = batch * src, batch * tgt
  params_x_tokens = (n_enc * (4 * d * inner + mlp) * s_tok
                     + n_dec * ((6 * d * inner + mlp) * t_tok + 2 * d * inner * s_tok)
                     + d * config.vocab_size * t_tok)  # the LM head
  attention = n_enc * 4 * src * inner * s_tok + n_dec * 4 * (tgt + src) * inner * t_tok
  return 3 * (2 * params_x_tokens + attention)


def batch_arrays(name, batch, length):
  rng = np.random.RandomState(0)
  data = {"input_ids": rng.randint(1000, 30000, (batch, length)).astype(np.int32),
          "attention_mask": np.ones((batch, length), np.int32)}
  if name in TARGET_LEN:  # no -100: every label token counts, on both sides
    data["labels"] = rng.randint(1000, 30000, (batch, TARGET_LEN[name])).astype(np.int32)
  elif name not in CAUSAL:
    data["token_type_ids"] = np.zeros((batch, length), np.int32)
    data["labels"] = rng.randint(0, 2, (batch,)).astype(np.int32)
  return data


def flaxhf_model_and_task(name, config, dtype):
  import jax.numpy as jnp
  from flaxhf.models import auto
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  if name in CAUSAL:
    from configs.clm import get_config
    from flaxhf.train.tasks_clm import CausalLM
    cfg = get_config("smoke")
    return auto.FlaxAutoModelForCausalLM.from_config(config, dtype=jdtype), CausalLM(cfg), cfg
  if name in TARGET_LEN:
    from configs.translation import get_config
    from flaxhf.train.tasks_seq2seq import Translation
    cfg = get_config("smoke")
    task = Translation(cfg)
    # What Seq2Seq.prepare records without a data set: the family, and a tokenizer whose size fits
    # the embeddings (configure_model reads only its length for a checkpoint's config).
    task.tokenizer, task.family = range(config.vocab_size), task.auto_class.model_class_for(config)
    task.configure_model(config, None)
    return auto.FlaxAutoModelForSeq2SeqLM.from_config(config, dtype=jdtype), task, cfg
  from configs.text_classification import get_config
  from flaxhf.data.text_classification import TaskData
  from flaxhf.train import tasks
  cfg = get_config("smoke")
  task = tasks.TextClassification(cfg)
  task.configure_model(config, TaskData(train=None, eval=None, label_list=None, num_labels=2,
                                        problem_type="single_label_classification"))
  return auto.FlaxAutoModelForSequenceClassification.from_config(config, dtype=jdtype), task, cfg


def flaxhf_step_time(name, config, batch, length, dtype, steps):
  import jax
  from flaxhf.train import engine
  model, task, cfg = flaxhf_model_and_task(name, config, dtype)
  state, step = engine.make_train_step(model, task, cfg.train, 1000)
  data = jax.device_put(batch_arrays(name, batch, length))
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


def torch_step_time(name, config, batch, length, dtype, steps):
  import torch
  import transformers
  torch.manual_seed(0)
  model = getattr(transformers, TORCH_CLASS.get(name, "BertForSequenceClassification"))(config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  inputs = {k: torch.tensor(v, dtype=torch.long)
            for k, v in batch_arrays(name, batch, length).items()}
  if name in CAUSAL:
    inputs["labels"] = inputs["input_ids"]  # transformers shifts them: the same loss as CausalLM

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
  p.add_argument("--models", default="bert-base,minilm,gpt2",
                 help=f"comma-separated, of {list(SHAPES)}")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--skip_torch", action="store_true")
  args = p.parse_args()
  models, dtypes = args.models.split(","), args.dtypes.split(",")
  unknown = [m for m in models if m not in SHAPES]
  if unknown:
    p.error(f"unknown --models {unknown}; choose from {list(SHAPES)}")
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  # bf16 GEMMs show what each library's bf16 matmul reaches; MFU stays against the fp32 peak.
  peaks = machine.print_header(tuple(dict.fromkeys(["float32"] + dtypes)), title="train_step.py")
  peak = max(peaks["cpu", "float32"].values())
  print(f"MFU against the fp32 GEMM peak {peak / 1e9:.1f} GFLOP/s (best of jax and torch)")
  print(f"{'model':10s} {'dtype':9s} {'B x L':10s} {'flaxhf tok/s':>13s} {'MFU':>6s} "
        f"{'torch tok/s':>12s} {'MFU':>6s} {'flaxhf/torch':>12s}")
  for name in models:
    batch, length = SHAPES[name]
    config = model_config(name)
    flops = train_flops(name, config, batch, length)
    for dtype in dtypes:
      tf = flaxhf_step_time(name, config, batch, length, dtype, args.steps)
      tt = float("nan") if args.skip_torch else torch_step_time(name, config, batch, length, dtype,
                                                                args.steps)
      target = TARGET_LEN.get(name, 0)
      tok = batch * (length + target)
      shape = f"{batch}x{length}" + (f"+{target}" if target else "")
      print(f"{name:10s} {dtype:9s} {shape:10s} {tok / tf:13.0f} {flops / tf / peak:6.1%} "
            f"{tok / tt:12.0f} {flops / tt / peak:6.1%} {tt / tf:12.2f}", flush=True)


if __name__ == "__main__":
  main()
