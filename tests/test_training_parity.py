"""Training parity with PyTorch: gradients of every head, and optimizer trajectories of the engine.

Forward parity (test_model_parity) does not prove the backward pass: a parameter cut off from the
loss, or a loss reduced differently, still gives the right logits. Here the same weights get the
same gradients (every architecture x head), dropout has PyTorch's distribution, and the engine's
jitted step, with its AdamW, warmup, decay mask and clipping, follows a PyTorch transformers loop
step for step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models.base import flatten
from model_utils import TINY_CONFIGS, VOCAB, make_inputs, torch_model

AUTO = {"sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering,
        "multiple_choice": flaxhf.FlaxAutoModelForMultipleChoice,
        "masked_lm": flaxhf.FlaxAutoModelForMaskedLM}
CASES = [(arch, task) for arch in TINY_CONFIGS for task in AUTO]


def make_labels(task, inputs, seed=0):
  """Labels in transformers' format for the head, with -100 where the loss ignores a position."""
  rng = np.random.RandomState(seed)
  ids = inputs["input_ids"]
  if task == "sequence_classification":
    return {"labels": rng.randint(0, 3, ids.shape[0])}
  if task == "multiple_choice":
    return {"labels": rng.randint(0, ids.shape[1], ids.shape[0])}
  if task == "question_answering":
    return {"start_positions": rng.randint(0, ids.shape[1], ids.shape[0]),
            "end_positions": rng.randint(0, ids.shape[1], ids.shape[0])}
  labels = rng.randint(0, 3 if task == "token_classification" else VOCAB, ids.shape)
  keep = (inputs["attention_mask"] == 1) & (rng.rand(*ids.shape) < 0.5)
  keep[:, 0] = True
  return {"labels": np.where(keep, labels, -100)}


@pytest.mark.parametrize("arch,task", CASES, ids=[f"{a}-{t}" for a, t in CASES])
def test_gradients_match_pytorch(arch, task, tmp_path):
  pt = torch_model(arch, task)
  pt.save_pretrained(tmp_path)
  inputs, labels = make_inputs(arch, task), make_labels(task, make_inputs(arch, task))
  out = pt(**{k: torch.tensor(v) for k, v in {**inputs, **labels}.items()})
  out.loss.backward()
  want = {n: p.grad.numpy() for n, p in pt.named_parameters() if p.grad is not None}

  model = AUTO[task].from_pretrained(str(tmp_path))

  def loss(params):
    return model(**inputs, **labels, params=params).loss

  value, grads = jax.value_and_grad(loss)(model.params)
  np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)
  got = {k: np.asarray(v) for k, v in flatten(grads).items()}
  # Every weight PyTorch trains gets a gradient here, and the same one; the rest get none.
  assert set(want) <= set(got), sorted(set(want) - set(got))
  # atol against the largest gradient: some are exactly zero in math (a key bias under softmax,
  # a multiple-choice classifier bias) and rounding noise in both frameworks.
  scale = max(np.abs(w).max() for w in want.values())
  for name, g in got.items():
    np.testing.assert_allclose(g, want.get(name, np.zeros_like(g)), rtol=1e-4, atol=1e-5 * scale,
                               err_msg=name)


def _engine_trajectory(model_dir, task_name, batches, steps, train_overrides):
  """Params after each step of the engine's jitted train step on one device (dropout off)."""
  from configs import multiple_choice, text_classification
  from flaxhf.data.text_classification import TaskData
  from flaxhf.train import engine, tasks, tasks_mc
  module = {"seq": text_classification, "mc": multiple_choice}[task_name]
  cfg = module.get_config("smoke")
  cfg.train.update(train_overrides)
  task = {"seq": tasks.TextClassification, "mc": tasks_mc.MultipleChoice}[task_name](cfg)
  auto = AUTO["sequence_classification" if task_name == "seq" else "multiple_choice"]
  model = auto.from_pretrained(model_dir)
  task.configure_model(model.config, TaskData(train=None, eval=None, label_list=None,
                                              num_labels=model.config.num_labels,
                                              problem_type="single_label_classification"))
  state, step = engine.make_train_step(model, task, cfg.train, steps)
  history = []
  for batch in batches:
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    history.append((float(metrics["loss"]), jax.device_get(flatten(state["params"]))))
  return history


def _torch_trajectory(pt, batches, steps, t):
  """The same steps as a transformers-Trainer-style PyTorch loop: AdamW, linear warmup/decay."""
  named = list(pt.named_parameters())
  no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
  decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}], lr=t["learning_rate"],
                          betas=(0.9, 0.999), eps=1e-8)
  sched = transformers.get_linear_schedule_with_warmup(
      opt, int(round(t["warmup_ratio"] * steps)), steps)
  pt.train()  # dropout is 0 in the config, so train mode is deterministic
  history = []
  for batch in batches:
    loss = pt(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pt.parameters(), t["max_grad_norm"])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    history.append((loss.item(), {n: p.detach().numpy().copy() for n, p in pt.state_dict().items()}))
  return history


@pytest.mark.parametrize("task_name", ["seq", "mc"])
def test_engine_steps_follow_pytorch_adamw(task_name, tmp_path):
  steps = 6
  task = "sequence_classification" if task_name == "seq" else "multiple_choice"
  pt = torch_model("bert", task, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  pt.save_pretrained(tmp_path)
  batches = []
  for i in range(steps):
    inputs = make_inputs("bert", task, batch=4, seed=i)
    batches.append({**inputs, **make_labels(task, inputs, seed=i)})
  # Large enough that weight decay and clipping (max norm 0.5) both act in every step.
  t = dict(learning_rate=3e-3, warmup_ratio=0.34, weight_decay=0.1, max_grad_norm=0.5)
  start = {n: p.detach().numpy().copy() for n, p in pt.state_dict().items()}
  got = _engine_trajectory(str(tmp_path), task_name, batches, steps, t)
  want = _torch_trajectory(pt, batches, steps, t)
  # The choice classifier's bias cancels in the softmax over choices: its gradient is rounding noise
  # (~1e-8) that Adam scales up to lr-sized steps of either sign, in both frameworks alike.
  skip = {"classifier.bias"} if task_name == "mc" else set()
  for i, ((gl, gp), (wl, wp)) in enumerate(zip(got, want)):
    np.testing.assert_allclose(gl, wl, rtol=1e-5, err_msg=f"loss at step {i + 1}")
    for name in set(wp) - skip:
      # atol is 1% of one step (lr): Adam's m / sqrt(v) magnifies rounding in near-zero gradients.
      np.testing.assert_allclose(gp[name], wp[name], rtol=1e-4, atol=1e-2 * t["learning_rate"],
                                 err_msg=f"{name} step {i + 1}")
  # The steps moved every trained weight well beyond the tolerance.
  for name in ("classifier.weight", "bert.pooler.dense.weight", "bert.embeddings.LayerNorm.weight",
               "bert.encoder.layer.1.output.dense.bias"):
    assert np.abs(got[-1][1][name] - start[name]).max() > 1e-3, name


@pytest.mark.parametrize("includes_padding", [False, True])
def test_qa_task_loss_and_gradients_against_pytorch(includes_padding, tmp_path):
  """The engine's QA loss: transformers' own with `train.loss_includes_padding`, else padding-free.

  Padding-free means each row's loss is what transformers gives that row without its padding, so
  bucket padding cannot move it; with the switch on, it is transformers' loss on the padded batch.
  """
  from configs import qa
  from flaxhf.train import tasks_qa
  pt = torch_model("bert", "question_answering")
  pt.save_pretrained(tmp_path)
  inputs = make_inputs("bert", "question_answering", batch=3, length=12, seed=3)
  inputs["attention_mask"][1, 5:] = 0  # rows padded by 0, 3 and 7 tokens
  inputs["input_ids"] = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], 0)
  inputs["token_type_ids"] *= inputs["attention_mask"]
  labels = {"start_positions": np.array([1, 2, 4]), "end_positions": np.array([3, 4, 8])}
  lengths = inputs["attention_mask"].sum(1)

  def torch_loss(rows, n):
    return pt(**{k: torch.tensor(v[rows, :n]) for k, v in inputs.items()},
              **{k: torch.tensor(v[rows]) for k, v in labels.items()}).loss

  if includes_padding:
    want_loss = torch_loss(slice(None), None)
  else:  # mean over rows of each unpadded row's loss, as one batch of three
    want_loss = sum(torch_loss([i], lengths[i]) for i in range(3)) / 3
  want_loss.backward()
  want = {n: p.grad.numpy() for n, p in pt.named_parameters() if p.grad is not None}

  cfg = qa.get_config("smoke")
  cfg.train.loss_includes_padding = includes_padding
  task = tasks_qa.QuestionAnswering(cfg)
  model = flaxhf.FlaxAutoModelForQuestionAnswering.from_pretrained(str(tmp_path))
  batch = {k: jnp.asarray(v) for k, v in {**inputs, **labels}.items()}

  def loss(params):
    total, count = task.loss(model(**inputs, params=params), batch)
    return total / count

  value, grads = jax.value_and_grad(loss)(model.params)
  np.testing.assert_allclose(float(value), want_loss.item(), rtol=1e-5)
  got = {k: np.asarray(v) for k, v in flatten(grads).items()}
  scale = max(np.abs(w).max() for w in want.values())
  for name, w in want.items():
    np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
  # The two losses differ on this batch: the switch changes what is trained.
  cfg.train.loss_includes_padding = not includes_padding
  flipped, count = tasks_qa.QuestionAnswering(cfg).loss(model(**inputs), batch)
  assert abs(float(flipped / count) - float(value)) > 1e-3


# The hidden-state dropouts (embeddings, block outputs, heads) and attention dropout each on their
# own, so one cannot mask the other: the encoder's seen in the base model's last hidden states, the
# heads' own in three heads' logits.
DROPOUT_CASES = [(arch, task, site) for arch in TINY_CONFIGS
                 for task, site in ((None, "hidden"), (None, "attention"),
                                    ("sequence_classification", "hidden"),
                                    ("token_classification", "hidden"),
                                    ("question_answering", "hidden"))]
DROPOUT_RATES = {  # site -> config kwargs; distilbert names its rates differently
    "hidden": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0),
    "attention": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3),
    "distilbert-hidden": dict(dropout=0.3, qa_dropout=0.3, seq_classif_dropout=0.3,
                              attention_dropout=0.0),
    "distilbert-attention": dict(dropout=0.0, qa_dropout=0.0, seq_classif_dropout=0.0,
                                 attention_dropout=0.3),
}


def _dropout_outputs(task, out, stack):
  """The outputs a head's dropout reaches, as one float array."""
  if task is None:
    x = out.last_hidden_state
  elif task == "question_answering":
    x = stack([out.start_logits, out.end_logits], -1)
  else:
    x = out.logits
  return np.asarray(x.detach() if hasattr(x, "detach") else x)


@pytest.mark.parametrize("arch,task,site", DROPOUT_CASES,
                         ids=[f"{a}-{t}-{s}" for a, t, s in DROPOUT_CASES])
def test_dropout_matches_pytorch_in_distribution(arch, task, site, tmp_path):
  """Train-mode outputs over many dropout draws: the same mean and spread as PyTorch's.

  The gradient tests run without dropout, so this is what shows dropout sits at transformers'
  places with its rates: a missing or extra dropout moves the spread of the outputs by far more
  than the sampling error of 4000 draws (~1% on the summed variance).
  """
  rates = DROPOUT_RATES.get(f"{arch}-{site}", DROPOUT_RATES[site])
  # Weights 10x the usual init, so the residual branches (and their dropouts) weigh as much as the
  # embeddings: at std 0.02 a missing dropout on a block's output hides in the sampling error.
  pt = torch_model(arch, task, initializer_range=0.2, **rates)
  pt.save_pretrained(tmp_path)
  n = 4000  # copies of one input row: each copy gets its own dropout masks on both sides
  inputs = {k: np.repeat(v[:1], n, axis=0) for k, v in make_inputs(arch, task).items()}
  pt.train()
  with torch.no_grad():
    out = pt(**{k: torch.tensor(v) for k, v in inputs.items()})
  want = _dropout_outputs(task, out, torch.stack)
  model = (AUTO[task] if task else flaxhf.FlaxAutoModel).from_pretrained(str(tmp_path))
  got = _dropout_outputs(task, model(**inputs, train=True, dropout_rng=jax.random.key(0)), jnp.stack)
  # Dropout is on: the copies differ, and each side's mean is the other's within sampling error.
  assert want.std(0).min() > 1e-3 and got.std(0).min() > 1e-3
  error = np.sqrt((want.var(0) + got.var(0)) / n)
  assert np.all(np.abs(got.mean(0) - want.mean(0)) < 5 * error)
  # The spread: summed over outputs (sampling error ~1%), and loosely output by output.
  print(f"variance ratio flaxhf / PyTorch: {got.var(0).sum() / want.var(0).sum():.4f}")
  assert got.var(0).sum() / want.var(0).sum() == pytest.approx(1, abs=0.04)
  np.testing.assert_allclose(got.std(0), want.std(0), rtol=0.1)


def test_dropout_mask_rate_independence_and_expectation():
  """flaxhf's dropout draws 16 bits per decision, two from each 32-bit word: the keep rate is the
  configured one (to 1/65536) within sampling error, the two halves of a word are uncorrelated,
  the expectation is kept, and the mask depends on the key only."""
  from flaxhf.models.layers import dropout, dropout_keep
  for rate in (0.1, 0.37, 0.5):
    keep, scale = dropout_keep(jax.random.key(0), rate, (64, 12, 33, 129))  # an odd last axis
    k = np.asarray(keep)
    assert k.shape == (64, 12, 33, 129) and k.dtype == bool
    p = 1.0 - rate
    assert abs(k.mean() - p) < 5 * np.sqrt(p * (1 - p) / k.size), (rate, k.mean())
    assert scale * round(p * 65536) == pytest.approx(65536, rel=1e-12)
    first, second = k[..., 0:128:2].ravel(), k[..., 1:129:2].ravel()  # the halves of one word
    assert abs(np.corrcoef(first, second)[0, 1]) < 5 / np.sqrt(first.size)
    rows = k.reshape(-1, 129)  # and neighbouring rows, drawn from neighbouring words
    assert abs(np.corrcoef(rows[:-1].ravel(), rows[1:].ravel())[0, 1]) < 5 / np.sqrt(rows.size)
  x = jnp.ones((1000, 1000))
  y = np.asarray(dropout(x, 0.1, jax.random.key(1)))
  assert set(np.unique(y)) == {0.0, np.float32(65536 / round(0.9 * 65536))}
  assert abs(y.mean() - 1.0) < 5 * np.sqrt(0.1 / 0.9 / y.size)
  np.testing.assert_array_equal(y, np.asarray(dropout(x, 0.1, jax.random.key(1))))
  assert (y != np.asarray(dropout(x, 0.1, jax.random.key(2)))).mean() > 0.1
  assert dropout(x, 0.0, jax.random.key(1)) is x
  assert not np.asarray(dropout(x, 1.0, jax.random.key(1))).any()
