"""Tasks plug data preparation, loss, predictions and metrics into the one training engine."""

import importlib

import jax.numpy as jnp
import numpy as np
import optax

from flaxhf import metrics as M
from flaxhf.models import auto
from flaxhf.models.losses import IGNORE_INDEX


class Task:
  """What the engine needs to know about a fine-tuning task."""

  name = ""
  auto_class = None
  model_inputs = ("input_ids", "attention_mask", "token_type_ids")
  label_fields = ("labels",)

  def __init__(self, cfg):
    self.cfg = cfg

  def prepare(self, tokenizer):
    """Reads and tokenizes the data; returns a flaxhf.data TaskData."""
    raise NotImplementedError

  def configure_model(self, config, task_data):
    """Writes task facts (labels, problem type) into the transformers config before loading."""

  def device_transform(self, batch, rng, train: bool):
    """Jit-side batch corruption before the forward pass (e.g. MLM masking); identity by default."""
    return batch

  def loss(self, outputs, batch):
    """(sum of per-example losses, number of examples or tokens) for one (micro)batch."""
    raise NotImplementedError

  def predict(self, outputs, batch):
    """Per-example predictions computed on device (a pytree of arrays with a batch axis)."""
    raise NotImplementedError

  def metrics(self, predictions, task_data) -> dict:
    """Eval metrics from a list of per-example prediction pytrees, in example order."""
    raise NotImplementedError

  def generate_eval(self, model, params, task_data, mesh):
    """Device work an eval scores beyond the forward pass (seq2seq: generating text from every eval
    source), run by every process before metrics(); nothing by default."""

  def samples(self, model, params, task_data) -> list:
    """Examples to log at each eval during training (e.g. generated text); none by default."""
    return []

  def save_outputs(self, output_dir: str):
    """Writes files of the latest metrics() call (e.g. QA predictions.json); nothing by default."""

  @property
  def main_metric(self):
    """(name, mode) of the metric that picks the best checkpoint."""
    return "accuracy", "max"


def _ce_sum(logits_NxC, labels_N):
  valid = labels_N != IGNORE_INDEX
  per = optax.softmax_cross_entropy_with_integer_labels(logits_NxC.astype(jnp.float32),
                                                        jnp.where(valid, labels_N, 0))
  return jnp.sum(per * valid), jnp.sum(valid)


class TextClassification(Task):
  """GLUE-style single sentence / sentence pair classification or regression."""

  name = "text_classification"
  auto_class = auto.FlaxAutoModelForSequenceClassification

  def prepare(self, tokenizer):
    from flaxhf.data.text_classification import prepare_text_classification
    return prepare_text_classification(self.cfg.data, tokenizer)

  def configure_model(self, config, task_data):
    config.num_labels = task_data.num_labels
    config.problem_type = task_data.problem_type
    if task_data.label_list:
      config.id2label = {i: str(l) for i, l in enumerate(task_data.label_list)}
      config.label2id = {str(l): i for i, l in enumerate(task_data.label_list)}
    self.problem_type = task_data.problem_type
    self.task_name = getattr(task_data, "task_name", None) or self.cfg.data.get("task_name")

  def loss(self, outputs, batch):
    logits, labels = outputs.logits.astype(jnp.float32), batch["labels"]
    n = jnp.asarray(labels.shape[0], jnp.float32)
    if self.problem_type == "regression":
      return jnp.sum(jnp.square(logits[:, 0] - labels.astype(jnp.float32))), n
    if self.problem_type == "multi_label_classification":
      per = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
      return jnp.sum(per), n
    return _ce_sum(logits, labels)

  def predict(self, outputs, batch):
    logits = outputs.logits
    if self.problem_type == "regression":
      return logits[:, 0]
    if self.problem_type == "multi_label_classification":
      return (logits > 0).astype(jnp.int32)
    return jnp.argmax(logits, -1)

  def metrics(self, predictions, task_data):
    labels = np.asarray(task_data.eval.values["labels"])
    return M.classification_metrics(self.task_name, np.stack(predictions), labels,
                                    problem_type=self.problem_type)

  @property
  def main_metric(self):
    if self.problem_type == "regression":
      return "pearson", "max"
    if self.task_name == "cola":
      return "matthews_correlation", "max"
    return "accuracy", "max"


# Tasks in other modules are named by import path: they subclass Task, so importing them here
# eagerly would be circular.
TASKS = {"text_classification": TextClassification,
         "token_classification": "flaxhf.train.tasks_token.TokenClassification",
         "multiple_choice": "flaxhf.train.tasks_mc.MultipleChoice",
         "question_answering": "flaxhf.train.tasks_qa.QuestionAnswering",
         "masked_lm": "flaxhf.train.tasks_mlm.MaskedLM",
         "causal_lm": "flaxhf.train.tasks_clm.CausalLM",
         "sft": "flaxhf.train.tasks_sft.SFT",
         "translation": "flaxhf.train.tasks_seq2seq.Translation",
         "summarization": "flaxhf.train.tasks_seq2seq.Summarization"}


def get_task(cfg) -> Task:
  if cfg.task not in TASKS:
    raise ValueError(f"Unknown task {cfg.task!r}; flaxhf trains {sorted(TASKS)}.")
  cls = TASKS[cfg.task]
  if isinstance(cls, str):
    module, name = cls.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
  return cls(cfg)

