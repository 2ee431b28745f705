"""Fine-tunes in flaxhf's engine vs a careful PyTorch loop: MiniLM for NER, QA and multiple choice;
a small encoder-decoder from scratch for translation and summarization.

  python benchmarks/compare_tasks.py [--tasks ner,qa,mc,translation,summarization] [--steps N]
      [--batch_size B] [--lr LR] [--max_length L] [--max_train_samples N] [--max_eval_samples N]
      [--only flaxhf|torch] [--seeds 42,43,44] [--set KEY=VALUE ...] [--dropout_off]
      [--family bart|t5|marian] [--quick]

Tasks use their `local` configs (configs/{token_classification,qa,multiple_choice}.py): CoNLL-2003,
the SQuAD v1.1 article split and CODAH (SWAG layout), all with the offline MiniLM checkpoint.
Unset flags take each task's default (see --help; ~35 min in all per seed on 2 quiet CPU cores).

Both sides: the same preprocessed examples (flaxhf's own data prep, so identical token ids and
labels), the same batches in the same order (flaxhf's batcher and seed), steps, batch, learning
rate, linear warmup/decay, AdamW betas/eps/weight decay and gradient clipping, all read from the one
config; the same metric code (the task's `metrics`, so seqeval, SQuAD post-processing + EM/F1, and
accuracy run on the PyTorch predictions too). PyTorch pads each batch to its longest example
(dynamic padding); flaxhf pads to length buckets. Both train the same loss: for QA that is flaxhf's
default, which leaves padded positions out of the start/end softmax, written out in the PyTorch loop
too (`--set train.loss_includes_padding=True` gives both sides transformers' loss). Both start from
the same weights: PyTorch loads flaxhf's initial parameters (the checkpoint plus the head flaxhf
drew; with `--only torch` too), so what differs between the sides is only the dropout draws
(`--independent_init` gives PyTorch its own head draw instead). `--dropout_off` removes those too:
with every dropout rate 0, the QA fine-tune gave the same EM/F1 to the hundredth on both sides
(seeds 42 and 43).
With several seeds (which change the head's initialisation, dropout and data order on both sides)
the table ends with each side's mean and standard deviation: compare means, since one seed moves
CODAH accuracy by a point or more.

Translation (Tatoeba en-ro, 5% held out) and summarization (DialogSum train / dev) use the `local`
configs of configs/{translation,summarization}.py: a `--family` model (default bart; 128 wide, 3+3
layers) from scratch with the tokenizer trained on the train text. PyTorch draws the initial
weights (transformers' init for that config, with the vocabulary and special ids flaxhf's task
sets) and saves them; flaxhf fine-tunes from that folder, so both start from the same weights.
Same batches in the same order (flaxhf's batcher; PyTorch pads to the batch's longest), the same
loss (the config's label smoothing, 0.1 in `local`: transformers' LabelSmoother on flaxhf's side,
torch's cross_entropy(label_smoothing=) on PyTorch's, the same formula), the same optimizer and
schedule; then both generate from every eval source with the config's eval.* settings (greedy,
eval.max_new_tokens) and the task's own scorer (sacrebleu BLEU / rouge-score ROUGE-L via
flaxhf.metrics) scores the decoded text. Both sides also report the eval loss (the unsmoothed NLL
of the references, teacher-forced, as flaxhf's eval computes it) and every step's train loss,
printed side by side: greedy scores of a model this young swing by points between seeds (DialogSum
ROUGE-L 10.4-21.7 over five) while the losses agree to ~0.01. The table ends with whether flaxhf's mean is within 1
point of PyTorch's. A few hundred steps only start to translate (BLEU of a few points), so a small
difference there says less than it would at convergence: raise --steps for a stronger check.
Chat SFT (`--tasks sft`: configs/sft.py:local, GPTeacher conversations with the ChatML-style
template, a `--sft_family` decoder from scratch, default a 4-layer 128-wide Llama): PyTorch draws
the initial weights as above; both sides train on flaxhf's packed rows in the same order, the loss
on assistant tokens only. PyTorch takes a packed row as transformers takes packed sequences
(positions restarting per conversation, no attention mask, use_cache=False), so attention stays
within each conversation on both sides. The table adds both train-loss curves, step by step, and
whether flaxhf's eval assistant-token loss is within 1% of PyTorch's (there is no dropout in
these models: the runs differ by float rounding only; `--quick` measured 10.1776 on both sides, the
curves equal to 4 decimals over 20 steps).
`--quick` checks the script end to end in about a minute: the `smoke` variants (a 64-wide 2+2 model,
48-token texts), 20 steps, 16 eval examples (MiniLM tasks: 20 steps, 320 train / 16 eval examples).

The machine header (benchmarks/machine.py: CPU, cores, flags, versions, GEMM peaks) comes first.
Wall s is the training loop plus evaluation; for flaxhf it includes jit compilation, the final
checkpoint and the export (as finetune_sst2.py), not data prep or model loading.
"""

import argparse
import ast
import importlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks import machine  # noqa: E402

# Per task: config module, PyTorch auto class, and the defaults of the flags left unset (lr None:
# the local config's). Per seed, both sides, 2 quiet cores: ~5 min NER, ~25 min QA, ~6 min MC. QA
# runs 300 steps at lr 1e-4: at the local config's 3e-4, 150 steps are unstable (PyTorch's F1 ran
# from 20.7 to 36.7 over three seeds).
TASKS = {
    "ner": dict(config="configs.token_classification", auto="AutoModelForTokenClassification",
                steps=300, batch_size=16, lr=None, max_length=128, max_train_samples=None,
                max_eval_samples=None),
    "qa": dict(config="configs.qa", auto="AutoModelForQuestionAnswering",
               steps=300, batch_size=16, lr=1e-4, max_length=256, max_train_samples=None,
               max_eval_samples=300),
    "mc": dict(config="configs.multiple_choice", auto="AutoModelForMultipleChoice",
               steps=300, batch_size=8, lr=None, max_length=64, max_train_samples=None,
               max_eval_samples=None),
    # From scratch: batch size, lr (1e-3) and lengths from the local config (None: keep it).
    "translation": dict(config="configs.translation", auto="AutoModelForSeq2SeqLM", steps=500,
                        batch_size=None, lr=None, max_length=None, max_train_samples=None,
                        max_eval_samples=None),
    "summarization": dict(config="configs.summarization", auto="AutoModelForSeq2SeqLM", steps=300,
                          batch_size=None, lr=None, max_length=None, max_train_samples=None,
                          max_eval_samples=None),
    # Chat SFT from scratch (configs/sft.py:local: a small Llama, GPTeacher, packed rows).
    "sft": dict(config="configs.sft", auto="AutoModelForCausalLM", steps=200, batch_size=None,
                lr=None, max_length=None, max_train_samples=2000, max_eval_samples=None),
}
NAMES = {"ner": "NER (CoNLL-2003)", "qa": "QA (SQuAD split)", "mc": "MC (CODAH)",
         "translation": "MT (Tatoeba en-ro)", "summarization": "Sum (DialogSum)",
         "sft": "SFT (GPTeacher)"}
SEQ2SEQ = ("translation", "summarization")
FROM_SCRATCH = SEQ2SEQ + ("sft",)  # PyTorch draws the initial weights, both sides start there
QUICK = dict(steps=20, max_train_samples=320, max_eval_samples=16)  # --quick, unless a flag is set


def task_config(name, args, seed):
  """The task's `local` config with this run's overrides (the config stays locked: typos fail)."""
  spec = TASKS[name]
  variant = "local" + (",smoke" if args.quick and name in FROM_SCRATCH else "")
  if name in SEQ2SEQ:
    variant += f",family={args.family}"
  elif name == "sft":
    variant += f",family={args.sft_family}"
  cfg = importlib.import_module(spec["config"]).get_config(variant)

  def pick(flag):  # an explicit flag wins over --quick, then the task default
    value = getattr(args, flag)
    if value is None and args.quick and flag in QUICK:
      return QUICK[flag]
    return spec[flag] if value is None else value

  for key, flag in (("steps", "steps"), ("batch_size", "batch_size"), ("learning_rate", "lr")):
    if pick(flag) is not None:  # None: the local config's
      cfg.train[key] = pick(flag)
  if name in FROM_SCRATCH and args.quick:  # one shape each: one train, eval, generate program
    cfg.train.eval_batch_size = 16
    cfg.data.buckets = (int(cfg.data.max_length),)
  if name == "sft":
    cfg.eval.num_samples = 0  # replies are logged, not scored: nothing to compare
    if pick("max_length") is not None:
      cfg.data.max_length = pick("max_length")
  elif name in SEQ2SEQ:
    if pick("max_length") is not None:  # sources; the padding cap must hold the targets too
      cfg.data.max_source_length = pick("max_length")
      cfg.data.max_length = max(pick("max_length"), cfg.data.max_target_length)
  else:
    cfg.data.max_length = pick("max_length")
  if name == "qa":  # keep run_qa.py's overlap of a third (128 of 384) for shorter windows
    cfg.data.doc_stride = min(cfg.data.doc_stride, cfg.data.max_length // 3)
  cfg.data.max_train_samples = pick("max_train_samples")
  cfg.data.max_eval_samples = pick("max_eval_samples")
  cfg.train.seed = seed
  cfg.train.eval_every, cfg.train.log_every, cfg.train.progress_bar = 0, 50, False
  if name in FROM_SCRATCH:  # every step's loss, to set the two loss curves side by side
    cfg.train.log_every = 1
  cfg.checkpoint.every_steps = cfg.train.steps  # one checkpoint at the end, like saving the model
  cfg.mesh.data = 1
  if args.dropout_off and name not in FROM_SCRATCH:
    cfg.model.name_or_path = without_dropout(cfg.model.name_or_path)
  # From scratch, scratch_init zeroes the rates of the config both sides start from; with
  # --independent_init flaxhf draws its own weights from config_overrides, which must say it too.
  if args.dropout_off and name in FROM_SCRATCH and args.independent_init:
    zeros = ",".join(f"{k}=0.0" for k in dropout_keys(cfg))
    cfg.model.config_overrides = ",".join(filter(None, [cfg.model.config_overrides, zeros]))
  for item in args.set:  # e.g. train.loss_includes_padding=True; a mistyped key fails here
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string
    cfg.update_from_flattened_dict({key: value})
  return cfg


def dropout_keys(cfg):
  """The float config keys naming a dropout rate in the from-scratch model cfg describes."""
  from flaxhf.train import engine
  config = engine.load_model_config(cfg.model, None)
  return sorted(k for k, v in config.to_dict().items() if "dropout" in k and isinstance(v, float))


def without_dropout(model_dir):
  """A copy of the model folder (files linked) whose config.json sets every dropout rate to 0."""
  import json
  out = os.path.join(tempfile.gettempdir(), "compare_tasks_no_dropout")
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  for name in os.listdir(model_dir):
    if name != "config.json":
      os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(out, name))
  with open(os.path.join(model_dir, "config.json")) as f:
    config = json.load(f)
  config.update({k: 0.0 for k, v in config.items() if "dropout" in k and isinstance(v, float)})
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return out


def main_metric(task, metrics):
  """(label, values) of the task's headline metric, with SQuAD's exact match alongside its F1."""
  key = task.main_metric[0]
  if task.name == "sft":  # the assistant-token loss (perplexity is its exp)
    return "loss", (float(metrics["loss"]),)
  if "exact_match" in metrics:
    return "EM/F1", (float(metrics["exact_match"]), float(metrics[key]))
  return key, (float(metrics[key]),)


def fmt(values):
  return "/".join(f"{v:.2f}" if v > 1 else f"{v:.4f}" for v in values)


def run_flaxhf(cfg, init_dir=None, train=True):
  """Trains and evaluates through engine.Trainer on one device; returns (metrics, wall s, data).

  With `init_dir`, the initial parameters (head included) are saved there first, in PyTorch format;
  with `train=False` that is all it does (returns (None, None, data)).
  """
  import jax
  from flaxhf.train import engine
  with tempfile.TemporaryDirectory() as workdir:
    trainer = engine.Trainer(cfg, workdir, devices=jax.devices()[:1])
    if init_dir:
      trainer.model.save_pretrained(init_dir, params=trainer.state["params"])
    if not train:
      trainer.ckpt.close()
      return None, None, trainer.data
    t0 = time.perf_counter()
    try:
      results = trainer.fit()
    finally:
      trainer.ckpt.close()
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # the logged train losses, by step
      curve = {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}
  return {**results, "curve": curve}, wall, trainer.data


def exact_buckets(max_length):
  """Buckets of every length: flaxhf's batcher then pads to the batch's longest row (dynamic)."""
  return tuple(range(1, max_length + 1))


def to_torch(batch, keys, n=None):
  """The first n rows of the batch's `keys` as int64 tensors (the dtype transformers expects)."""
  import torch
  return {k: torch.from_numpy(np.asarray(batch[k][:n], np.int64)) for k in keys if k in batch}


def torch_loss(cfg, model, batch):
  """The loss flaxhf's task trains, on the PyTorch side.

  transformers' model loss everywhere, except QA with `train.loss_includes_padding=False` (flaxhf's
  default): there padded positions are left out of the start/end softmax, as flaxhf's
  QuestionAnswering.loss does, so both sides train the same objective on their different padding.
  """
  import torch
  from flaxhf.train.tasks_qa import _MASKED  # the value flaxhf's QA loss gives padded positions
  if "start_positions" not in batch or cfg.train.get("loss_includes_padding", False):
    return model(**batch).loss
  labels = {k: batch.pop(k) for k in ("start_positions", "end_positions")}
  out = model(**batch)
  pad = batch["attention_mask"] == 0

  def ce(logits, positions):
    logits = logits.float().masked_fill(pad, _MASKED)
    return torch.nn.functional.cross_entropy(logits, positions)

  return (ce(out.start_logits, labels["start_positions"])
          + ce(out.end_logits, labels["end_positions"])) / 2


def torch_update(loss, model, opt, sched, max_grad_norm):
  """One PyTorch optimizer step from `loss`, clipped as the engine clips (shared by every task)."""
  import torch
  loss.backward()
  if max_grad_norm:
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
  opt.step()
  sched.step()
  opt.zero_grad(set_to_none=True)


def torch_optimizer(model, t):
  """(AdamW, schedule) as flaxhf.train.optim.make_optimizer builds them from the train config."""
  import torch
  import transformers
  named = list(model.named_parameters())
  no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
  decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=t.learning_rate,
                          betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps)
  # flaxhf.train.optim.make_optimizer's warmup rule, so both schedules peak on the same step.
  warmup = int(round(t.warmup_ratio * t.steps)) if t.warmup_steps is None else int(t.warmup_steps)
  return opt, transformers.get_linear_schedule_with_warmup(opt, warmup, t.steps)


def run_torch(name, cfg, task, data, threads, init_dir=None):
  """The same fine-tune as a PyTorch transformers loop, from `init_dir` if given; (metrics, wall s)."""
  import torch
  import transformers
  from flaxhf.data import batching
  transformers.logging.set_verbosity_error()  # the load report lists the new head, as flaxhf logs
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(threads)
  torch.manual_seed(cfg.train.seed)
  path, t = cfg.model.name_or_path, cfg.train
  config = transformers.AutoConfig.from_pretrained(path)
  task.configure_model(config, data)  # the labels / num_labels flaxhf's model gets
  auto = getattr(transformers, TASKS[name]["auto"])
  model = auto.from_pretrained(init_dir or path, config=config)
  opt, sched = torch_optimizer(model, t)
  pad = {"input_ids": config.pad_token_id or 0, "labels": -100, **data.pad_values}
  inputs, labels = tuple(task.model_inputs), tuple(task.label_fields)
  buckets = exact_buckets(cfg.data.max_length)
  # flaxhf's own batcher: the same rows per step, in the same order, padded to the batch's longest.
  batches = batching.train_batches(data.train, global_batch_size=t.batch_size, seed=t.seed,
                                   buckets=buckets, max_length=cfg.data.max_length,
                                   pad_values=pad, group_by_length=cfg.data.group_by_length)
  model.train()
  t0 = time.perf_counter()
  for _ in range(t.steps):
    loss = torch_loss(cfg, model, to_torch(next(batches), inputs + labels))
    torch_update(loss, model, opt, sched, t.max_grad_norm)
  model.eval()
  preds = [None] * len(data.eval)
  with torch.no_grad():
    for batch in batching.eval_batches(data.eval, global_batch_size=t.eval_batch_size,
                                       buckets=buckets, max_length=cfg.data.max_length,
                                       pad_values=pad):
      n = int(batch["example_mask"].sum())  # dummy rows fill only the tail of the last batch
      out = model(**to_torch(batch, inputs, n))
      if getattr(out, "start_logits", None) is not None:  # QA: logits for the span decoder
        p = {"start_logits": out.start_logits.float().numpy(),
             "end_logits": out.end_logits.float().numpy()}
      else:  # tags [n, L] or choices [n]: what flaxhf's task.predict returns
        p = out.logits.float().argmax(-1).numpy().astype(np.int32)
      for row, i in enumerate(batch["example_index"][:n]):
        preds[i] = ({k: v[row] for k, v in p.items()} if isinstance(p, dict) else p[row])
    metrics = task.metrics(preds, data)
  return metrics, time.perf_counter() - t0


# ---- from scratch: translation, summarization and chat SFT --------------------------------------
def scratch_init(name, cfg, args, seed, init_dir):
  """Builds the local config's from-scratch model in PyTorch, saves it (and the tokenizer) in
  `init_dir` and points cfg's model there, unless --independent_init; (torch model, task, data)."""
  import torch
  import transformers
  from flaxhf.train import engine
  from flaxhf.train.tasks import get_task
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  task = get_task(cfg)
  tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model.tokenizer)
  data = task.prepare(tokenizer)
  config = engine.load_model_config(cfg.model, None)
  task.configure_model(config, data)  # the vocabulary, special and start ids flaxhf's model gets
  if args.dropout_off:
    for key, value in config.to_dict().items():
      if "dropout" in key and isinstance(value, float):
        setattr(config, key, 0.0)
  torch.manual_seed(seed)
  model = getattr(transformers, TASKS[name]["auto"]).from_config(config)
  if not args.independent_init:  # flaxhf fine-tunes from PyTorch's initial weights
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    cfg.model.name_or_path = cfg.model.tokenizer = init_dir
    cfg.model.config_name = cfg.model.config_overrides = None
    cfg.model.from_scratch = False
  return model, task, data


def run_torch_seq2seq(cfg, model, task, data, threads):
  """The same fine-tune as a PyTorch loop, then generation and the task's text scores;
  (metrics, wall s)."""
  import torch
  from flaxhf.data import batching
  torch.set_num_threads(threads)
  torch.manual_seed(cfg.train.seed)
  t, d = cfg.train, cfg.data
  opt, sched = torch_optimizer(model, t)
  pad = {"input_ids": task.tokenizer.pad_token_id, "labels": -100, **data.pad_values}
  buckets = exact_buckets(int(d.max_length))
  batches = batching.train_batches(data.train, global_batch_size=t.batch_size, seed=t.seed,
                                   buckets=buckets, max_length=int(d.max_length), pad_values=pad,
                                   group_by_length=d.group_by_length)
  eps = float(t.label_smoothing)
  model.train()
  t0 = time.perf_counter()
  curve = {}
  for step in range(1, t.steps + 1):
    batch = to_torch(next(batches), ("input_ids", "attention_mask", "labels"))
    out = model(**batch)  # transformers shifts the labels into decoder inputs
    # torch's label smoothing is LabelSmoother's: (1 - eps) NLL + eps mean(-log p), over labels.
    loss = out.loss if not eps else torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100,
        label_smoothing=eps)
    curve[step] = float(loss.detach())
    torch_update(loss, model, opt, sched, t.max_grad_norm)
  model.eval()
  tokens = [None] * len(data.eval)
  kw = task.generation_kwargs()  # eval.*: what flaxhf's eval generates with
  nll, count = 0.0, 0
  with torch.inference_mode():
    for batch in batching.eval_batches(
        data.eval, global_batch_size=t.eval_batch_size, buckets=buckets,
        max_length={"input_ids": int(d.max_source_length), "labels": int(d.max_target_length)},
        pad_values=pad, sort_by_length=True):
      n = int(batch["example_mask"].sum())  # dummy rows fill only the tail of the last batch
      # flaxhf's eval loss: the unsmoothed NLL of the labels, teacher-forced, over label tokens.
      inputs = to_torch(batch, ("input_ids", "attention_mask", "labels"), n)
      logits = model(**inputs).logits.float()
      nll += float(torch.nn.functional.cross_entropy(
          logits.flatten(0, 1), inputs["labels"].flatten(), ignore_index=-100, reduction="sum"))
      count += int((inputs["labels"] != -100).sum())
      out = model.generate(**to_torch(batch, ("input_ids", "attention_mask"), n), **kw)
      for row, i in enumerate(batch["example_index"][:n]):
        tokens[i] = out[row].numpy()
  texts = [x.strip() for x in task.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
  metrics = task.text_metrics(texts, data.eval_raw["targets"])
  metrics.update(loss=nll / max(count, 1), curve=curve)
  return metrics, time.perf_counter() - t0


def run_torch_sft(cfg, model, task, data, threads):
  """The same chat SFT as a PyTorch loop over flaxhf's packed rows, then the assistant-token loss
  of the eval conversations; (metrics, wall s).

  A packed row goes in as transformers takes packed sequences: positions that restart with each
  conversation and no attention mask (transformers then keeps attention within each conversation;
  the padded tail is a segment of its own, after every real token), labels -100 off the
  assistant's turns and on each conversation's first token (flaxhf.train.tasks_sft.sft_labels)."""
  import torch
  from flaxhf.data import batching
  from flaxhf.train.tasks_clm import document_mask_and_positions
  from flaxhf.train.tasks_sft import sft_labels
  torch.set_num_threads(threads)
  torch.manual_seed(cfg.train.seed)
  t, length = cfg.train, int(cfg.data.max_length)
  opt, sched = torch_optimizer(model, t)
  pad = {"input_ids": task.tokenizer.pad_token_id or 0, **data.pad_values}
  buckets = exact_buckets(length)

  def packed(batch, n=None):
    doc, mask = np.asarray(batch["document_ids"][:n]), np.asarray(batch["attention_mask"][:n])
    _, positions = document_mask_and_positions(doc, mask)
    labels = sft_labels(np.asarray(batch["labels"][:n]), doc)
    return {"input_ids": torch.from_numpy(np.asarray(batch["input_ids"][:n], np.int64)),
            "position_ids": torch.from_numpy(np.asarray(positions, np.int64)),
            "labels": torch.from_numpy(np.asarray(labels, np.int64)), "use_cache": False}

  batches = batching.train_batches(data.train, global_batch_size=t.batch_size, seed=t.seed,
                                   buckets=buckets, max_length=length, pad_values=pad,
                                   group_by_length=cfg.data.group_by_length)
  model.train()
  t0 = time.perf_counter()
  curve = {}
  for step in range(1, t.steps + 1):
    loss = model(**packed(next(batches))).loss  # the mean over the batch's assistant tokens
    curve[step] = float(loss.detach())
    torch_update(loss, model, opt, sched, t.max_grad_norm)
  model.eval()
  total, count = 0.0, 0
  with torch.no_grad():
    for batch in batching.eval_batches(data.eval, global_batch_size=t.eval_batch_size,
                                       buckets=buckets, max_length=length, pad_values=pad):
      n = int(batch["example_mask"].sum())
      inputs = packed(batch, n)
      labels = inputs.pop("labels")
      logits = model(**inputs).logits[:, :-1].float()
      target = labels[:, 1:]
      total += float(torch.nn.functional.cross_entropy(
          logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
      count += int((target != -100).sum())
  loss = total / max(count, 1)
  return ({"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "tokens": count,
           "curve": curve}, time.perf_counter() - t0)


def run_scratch_task(name, args, seed):
  """Translation, summarization or SFT on both sides with one seed: a result row for the table."""
  from flaxhf.train.tasks import get_task
  cfg = task_config(name, args, seed)
  row = {"task": NAMES[name], "cfg": cfg, "seed": seed}
  init_dir = tempfile.mkdtemp(prefix="init_")
  try:
    model, task, data = scratch_init(name, cfg, args, seed, init_dir)
    row["model"] = (f"{model.config.model_type} {model.num_parameters() / 1e6:.1f}M params, "
                    f"vocab {model.config.vocab_size}")
    if args.only != "torch":
      results, row["flaxhf_s"], _ = run_flaxhf(cfg)
      row["flaxhf"] = main_metric(get_task(cfg), results)
      row.setdefault("curves", {})["flaxhf"] = results["curve"]
      row.setdefault("eval_loss", {})["flaxhf"] = float(results["loss"])
      print(f"[{name} seed {seed}] flaxhf: {row['flaxhf'][0]} {fmt(row['flaxhf'][1])}  "
            f"({row['flaxhf_s']:.1f} s)", flush=True)
    if args.only != "flaxhf":
      run = run_torch_sft if name == "sft" else run_torch_seq2seq
      metrics, row["torch_s"] = run(cfg, model, task, data, args.threads)
      row["torch"] = main_metric(task, metrics)
      row.setdefault("curves", {})["torch"] = metrics.get("curve", {})
      row.setdefault("eval_loss", {})["torch"] = float(metrics["loss"])
      print(f"[{name} seed {seed}] pytorch: {row['torch'][0]} {fmt(row['torch'][1])}  "
            f"({row['torch_s']:.1f} s)", flush=True)
  finally:
    shutil.rmtree(init_dir, ignore_errors=True)
  row["sizes"] = (len(data.train), len(data.eval))
  return row


def run_task(name, args, seed):
  """One task on both sides with one seed: a result row for the table."""
  from transformers import AutoTokenizer
  from flaxhf.train.tasks import get_task
  if name in FROM_SCRATCH:
    return run_scratch_task(name, args, seed)
  cfg = task_config(name, args, seed)
  row = {"task": NAMES[name], "cfg": cfg, "seed": seed}
  data = None
  init_dir = None if args.independent_init or args.only == "flaxhf" else tempfile.mkdtemp(
      prefix="init_")
  if args.only == "torch" and init_dir:  # flaxhf's initial weights, without its training run
    _, _, data = run_flaxhf(cfg, init_dir, train=False)
  if args.only != "torch":
    results, row["flaxhf_s"], data = run_flaxhf(cfg, init_dir)
    row["flaxhf"] = main_metric(get_task(cfg), results)
    print(f"[{name} seed {seed}] flaxhf: {row['flaxhf'][0]} {fmt(row['flaxhf'][1])}  "
          f"({row['flaxhf_s']:.1f} s)", flush=True)
  if args.only != "flaxhf":
    task = get_task(cfg)
    if data is None:  # torch only: the same prep the Trainer runs
      data = task.prepare(AutoTokenizer.from_pretrained(cfg.model.name_or_path))
    metrics, row["torch_s"] = run_torch(name, cfg, task, data, args.threads, init_dir)
    row["torch"] = main_metric(task, metrics)
    print(f"[{name} seed {seed}] pytorch: {row['torch'][0]} {fmt(row['torch'][1])}  "
          f"({row['torch_s']:.1f} s)", flush=True)
  row["sizes"] = (len(data.train), len(data.eval))
  if init_dir:
    shutil.rmtree(init_dir, ignore_errors=True)
  return row


def print_table(rows, threads):
  """The settings of each task, then task | metric | flaxhf | PyTorch | flaxhf s | PyTorch s."""
  print(f"\nFine-tunes, float32, one JAX device, torch threads {threads}")
  for r in [r for r in rows if r["seed"] == rows[0]["seed"]]:
    c = r["cfg"]
    unit = "windows" if "QA" in r["task"] else "rows" if "SFT" in r["task"] else "examples"
    if "model" in r and "SFT" in r["task"]:
      lengths = (f"rows of {c.data.max_length} packed tokens; {r['model']} from scratch")
    elif "model" in r:  # translation / summarization
      lengths = (f"source/target {c.data.max_source_length}/{c.data.max_target_length}, label "
                 f"smoothing {c.train.label_smoothing:g}, eval generation "
                 f"{task_generation(c)}; {r['model']} from scratch")
    else:
      lengths = f"max_length {c.data.max_length}; MiniLM"
    print(f"  {r['task']}: {c.train.steps} steps x {c.train.batch_size}, lr "
          f"{c.train.learning_rate:g}, warmup {c.train.warmup_ratio:g}, {lengths}, "
          f"{r['sizes'][0]} train / {r['sizes'][1]} eval {unit}")
  head = ("task", "seed", "metric", "flaxhf metric", "PyTorch metric", "flaxhf wall s",
          "PyTorch wall s")
  widths = (18, 5, 8, 16, 16, 13, 14)
  print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
  print("-+-".join("-" * w for w in widths))

  def line(task, seed, metric, f, t, fs, ts):
    cells = (task, seed, metric, f, t, fs, ts)
    print(" | ".join(str(x).ljust(w) for x, w in zip(cells, widths)))

  for r in rows:
    line(r["task"], r["seed"], (r.get("flaxhf") or r.get("torch"))[0],
         fmt(r["flaxhf"][1]) if "flaxhf" in r else "-", fmt(r["torch"][1]) if "torch" in r else "-",
         f"{r['flaxhf_s']:.1f}" if "flaxhf_s" in r else "-",
         f"{r['torch_s']:.1f}" if "torch_s" in r else "-")
  for task in dict.fromkeys(r["task"] for r in rows):
    runs = [r for r in rows if r["task"] == task]
    if len(runs) < 2:
      continue
    cells = []
    for side in ("flaxhf", "torch"):
      vals = np.array([r[side][1] for r in runs if side in r])
      cells.append("-" if not len(vals) else "/".join(
          (f"{m:.2f}+-{s:.2f}" if m > 1 else f"{m:.4f}+-{s:.4f}")
          for m, s in zip(vals.mean(0), vals.std(0, ddof=1))))
    secs = [np.mean([r[k] for r in runs]) if all(k in r for r in runs) else None
            for k in ("flaxhf_s", "torch_s")]
    line(task, "mean", (runs[0].get("flaxhf") or runs[0].get("torch"))[0], *cells,
         *(f"{x:.1f}" if x is not None else "-" for x in secs))
  for r in rows:  # from scratch: the train loss curves side by side
    curves = r.get("curves", {})
    if len(curves) == 2 and curves["flaxhf"] and curves["torch"]:
      steps = sorted(curves["flaxhf"])
      marks = sorted({1, 2, 5, *range(25, steps[-1] + 1, 25), steps[-1]} & set(steps))
      print(f"{r['task']} seed {r['seed']}, train loss by step (flaxhf / PyTorch): " + ", ".join(
          f"{k}: {curves['flaxhf'][k]:.4f}/{curves['torch'].get(k, float('nan')):.4f}" for k in marks))
  for task in dict.fromkeys(r["task"] for r in rows if "model" in r):  # BLEU / ROUGE points
    runs = [r for r in rows if r["task"] == task and "flaxhf" in r and "torch" in r]
    if runs and "SFT" in task:
      f, t = (np.mean([r[side][1][0] for r in runs]) for side in ("flaxhf", "torch"))
      print(f"{task}: eval assistant-token loss flaxhf {f:.4f} vs PyTorch {t:.4f} (mean of "
            f"{len(runs)} seed(s)): relative difference {(f - t) / t:+.2%}; within 1%: "
            f"{'yes' if abs(f - t) <= 0.01 * t else 'no'}")
    elif runs:
      losses = {side: [r["eval_loss"][side] for r in runs] for side in ("flaxhf", "torch")}
      print(f"{task}: eval loss (unsmoothed NLL, teacher-forced) per seed, flaxhf / PyTorch: "
            + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(losses["flaxhf"], losses["torch"]))
            + f"; means {np.mean(losses['flaxhf']):.4f} / {np.mean(losses['torch']):.4f}")
      f, t = (np.mean([r[side][1][0] for r in runs]) for side in ("flaxhf", "torch"))
      print(f"{task}: flaxhf {runs[0]['flaxhf'][0]} {f:.2f} vs PyTorch {t:.2f} (mean of "
            f"{len(runs)} seed(s)): difference {f - t:+.2f}; within 1 point: "
            f"{'yes' if abs(f - t) <= 1.0 else 'no'}")


def task_generation(c):
  """The eval generation settings of a seq2seq config, e.g. 'greedy, 64 new tokens'."""
  beams = int(c.eval.num_beams or 1)
  return f"{'greedy' if beams == 1 else f'beam {beams}'}, max {c.eval.max_new_tokens} new tokens"


def task_defaults(flag):
  """--help text listing each task's default for `flag`."""
  return "default: " + ", ".join(f"{n} {spec[flag] or 'all'}" for n, spec in TASKS.items())


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--tasks", default="ner,qa,mc",
                 help="comma-separated subset of ner,qa,mc,translation,summarization,sft")
  for flag in ("steps", "batch_size", "max_length", "max_train_samples", "max_eval_samples"):
    p.add_argument(f"--{flag}", type=int, default=None, help=task_defaults(flag))
  p.add_argument("--lr", type=float, default=None,
                 help="default: qa 1e-4, the others their local config's")
  p.add_argument("--seeds", default="42", help="comma-separated; every task runs once per seed")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="torch intra-op threads (default: the cores this process may use)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for every task, e.g. train.loss_includes_padding=True")
  p.add_argument("--only", choices=["flaxhf", "torch"], default=None)
  p.add_argument("--dropout_off", action="store_true",
                 help="every dropout rate 0 on both sides: the runs then differ only by rounding")
  p.add_argument("--independent_init", action="store_true",
                 help="PyTorch draws its own head instead of starting from flaxhf's initial "
                 "weights (translation/summarization: each side its own from-scratch init)")
  p.add_argument("--family", choices=["bart", "t5", "marian"], default="bart",
                 help="translation/summarization: the from-scratch model family")
  p.add_argument("--sft_family", choices=["llama", "mistral", "qwen2", "qwen3", "gpt2"],
                 default="llama", help="sft: the from-scratch decoder family")
  p.add_argument("--quick", action="store_true",
                 help="a check of seconds: tiny models, 20 steps, 16 eval examples")
  args = p.parse_args()
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    p.error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
  seeds = [int(x) for x in args.seeds.split(",")]
  import torch
  torch.set_num_threads(args.threads)
  machine.print_header(title="compare_tasks.py")
  rows = [run_task(n, args, seed) for n in names for seed in seeds]
  print_table(rows, args.threads)
  if args.set:
    print("config overrides: " + ", ".join(args.set))


if __name__ == "__main__":
  main()
