"""Token classification (NER) on the engine: per-token cross entropy, seqeval over word tags."""

import jax.numpy as jnp
import numpy as np

from flaxhf import metrics as M
from flaxhf.models import auto
from flaxhf.train.tasks import Task, _ce_sum


class TokenClassification(Task):
  """Tags every word; loss and predictions per sub-token, metrics on each word's first sub-token."""

  name = "token_classification"
  auto_class = auto.FlaxAutoModelForTokenClassification

  def prepare(self, tokenizer):
    from flaxhf.data.token_classification import prepare_token_classification
    return prepare_token_classification(self.cfg.data, tokenizer)

  def configure_model(self, config, task_data):
    config.num_labels = task_data.num_labels
    config.id2label = {i: str(l) for i, l in enumerate(task_data.label_list)}
    config.label2id = {str(l): i for i, l in enumerate(task_data.label_list)}

  def loss(self, outputs, batch):
    logits_BxLxK, labels_BxL = outputs.logits, batch["labels"]
    # Summed over labelled sub-tokens: the engine divides by their count across microbatches.
    return _ce_sum(logits_BxLxK.reshape(-1, logits_BxLxK.shape[-1]), labels_BxL.reshape(-1))

  def predict(self, outputs, batch):
    return jnp.argmax(outputs.logits, -1).astype(jnp.int32)  # [B, L] tag ids

  def metrics(self, predictions, task_data):
    words, names = task_data.eval_raw, task_data.label_list
    pred_tags = [[names[i] for i in np.asarray(p)[starts]]
                 for p, starts in zip(predictions, words.starts)]
    scores = M.seqeval_metrics(words.tags, pred_tags)
    out = {k: float(scores[k]) for k in ("precision", "recall", "f1", "accuracy")}
    out.update({f"{k}_f1": float(v["f1"]) for k, v in scores.items() if isinstance(v, dict)})
    return out

  @property
  def main_metric(self):
    return "f1", "max"
