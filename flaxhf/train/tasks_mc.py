"""Multiple choice on the engine: one score per choice, cross entropy over choices, accuracy."""

import jax.numpy as jnp
import numpy as np

from flaxhf import metrics as M
from flaxhf.models import auto
from flaxhf.train.tasks import Task, _ce_sum


class MultipleChoice(Task):
  """SWAG-style: each example holds [choices, length] inputs and the index of the right choice."""

  name = "multiple_choice"
  auto_class = auto.FlaxAutoModelForMultipleChoice

  def prepare(self, tokenizer):
    from flaxhf.data.multiple_choice import prepare_multiple_choice
    return prepare_multiple_choice(self.cfg.data, tokenizer)

  def loss(self, outputs, batch):
    return _ce_sum(outputs.logits, batch["labels"])  # logits [B, C]

  def predict(self, outputs, batch):
    return jnp.argmax(outputs.logits, -1).astype(jnp.int32)

  def metrics(self, predictions, task_data):
    return {"accuracy": M.accuracy(np.stack(predictions), task_data.eval.values["labels"])}
