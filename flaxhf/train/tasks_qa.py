"""Extractive question answering on the engine: start/end cross entropy, SQuAD metrics over windows."""

import json
import os

import jax.numpy as jnp
import numpy as np
import optax

from flaxhf import metrics as M
from flaxhf import qa
from flaxhf.models import auto
from flaxhf.train.tasks import Task

# Padding positions get this logit: never a label, never a predicted span, whatever the bucket.
_MASKED = -1e9


def _mask_padding(logits_BxL, attention_mask_BxL):
  return jnp.where(attention_mask_BxL > 0, logits_BxL.astype(jnp.float32), _MASKED)


class QuestionAnswering(Task):
  """SQuAD-style span extraction (v1.1, or v2 with `data.version_2_with_negative`)."""

  name = "question_answering"
  auto_class = auto.FlaxAutoModelForQuestionAnswering
  label_fields = ("start_positions", "end_positions")

  def __init__(self, cfg):
    super().__init__(cfg)
    self._predictions = None

  def prepare(self, tokenizer):
    from flaxhf.data.question_answering import prepare_question_answering
    return prepare_question_answering(self.cfg.data, tokenizer)

  def configure_model(self, config, task_data):
    config.num_labels = 2  # qa_outputs: one start and one end logit per token

  def loss(self, outputs, batch):
    """Start and end cross entropy over the window's tokens.

    By default padded positions are left out of the softmax, so the loss does not depend on how far
    a batch is padded. `train.loss_includes_padding=True` gives transformers' loss instead, whose
    softmax also spreads over the padded positions (the same numbers only for the same padding).
    """
    includes_padding = self.cfg.train.get("loss_includes_padding", False)

    def ce(logits, labels):
      logits = (logits.astype(jnp.float32) if includes_padding
                else _mask_padding(logits, batch["attention_mask"]))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    start = ce(outputs.start_logits, batch["start_positions"])
    end = ce(outputs.end_logits, batch["end_positions"])
    # transformers' loss is (mean start CE + mean end CE) / 2: summed here, divided by the engine.
    return jnp.sum(start + end) / 2, jnp.asarray(start.shape[0], jnp.float32)

  def predict(self, outputs, batch):
    mask = batch["attention_mask"]
    return {"start_logits": _mask_padding(outputs.start_logits, mask),
            "end_logits": _mask_padding(outputs.end_logits, mask)}

  def decode(self, predictions, task_data):
    """({id: answer text}, {id: n-best list}) from per-window logits, as HF's utils_qa."""
    d = self.cfg.data
    lengths = task_data.eval.lengths()  # drop the bucket padding of each window
    starts = [np.asarray(p["start_logits"])[:n] for p, n in zip(predictions, lengths)]
    ends = [np.asarray(p["end_logits"])[:n] for p, n in zip(predictions, lengths)]
    return qa.postprocess_qa_predictions(
        {"id": task_data.eval_raw["id"], "context": task_data.eval_raw["context"]},
        task_data.eval_features, starts, ends, n_best_size=int(d.n_best_size),
        max_answer_length=int(d.max_answer_length),
        version_2_with_negative=bool(d.version_2_with_negative),
        null_score_diff_threshold=float(d.null_score_diff_threshold))

  def metrics(self, predictions, task_data):
    answers, _ = self.decode(predictions, task_data)
    self._predictions = dict(answers)
    references = {i: a["text"] for i, a in zip(task_data.eval_raw["id"], task_data.eval_raw["answers"])}
    if self.cfg.data.version_2_with_negative:
      return {k: float(v) for k, v in M.squad_v2_metrics(answers, references).items()}
    return {k: float(v) for k, v in M.squad_metrics(answers, references).items()}

  def save_outputs(self, output_dir):
    if self._predictions is not None:  # {question id: answer text}, as run_qa.py writes it
      with open(os.path.join(output_dir, "predictions.json"), "w") as f:
        json.dump(self._predictions, f, indent=2, ensure_ascii=False)

  @property
  def main_metric(self):
    return "f1", "max"
