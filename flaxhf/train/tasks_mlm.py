"""Masked language modelling on the engine: masks drawn on device every step, perplexity to evaluate.

Masking follows transformers' DataCollatorForLanguageModeling: each token (never a special token or
padding) is chosen with probability `data.mlm_probability`; a chosen token becomes [MASK] 80% of the
time, a uniformly random token 10%, and stays itself 10%; the loss is cross entropy over the chosen
tokens. With `data.whole_word_mask` the choice is made per word (see flaxhf.data.mlm: `word_ids`),
so a word is masked with all its sub-tokens or not at all; the 80/10/10 split stays per token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxhf.models import auto
from flaxhf.models.losses import IGNORE_INDEX
from flaxhf.train.tasks import Task


def mask_tokens(rng, input_ids_BxL, attention_mask_BxL, special_ids, mask_id: int, vocab_size: int,
                probability: float = 0.15, word_ids_BxL=None, example_index_B=None):
  """(corrupted input ids, labels with -100 where not masked), both [B, L]."""
  # With example indices each row draws from fold_in(rng, index): an eval example is masked the same
  # way whatever its batch, row or mesh.
  shape = input_ids_BxL.shape
  if example_index_B is None:
    k_select, k_kind, k_token = jax.random.split(rng, 3)
    u_select = jax.random.uniform(k_select, shape)
    u_kind = jax.random.uniform(k_kind, shape)
    random_ids = jax.random.randint(k_token, shape, 0, vocab_size)
  else:
    def row(i):
      ks, kk, kt = jax.random.split(jax.random.fold_in(rng, i), 3)
      return (jax.random.uniform(ks, shape[1:]), jax.random.uniform(kk, shape[1:]),
              jax.random.randint(kt, shape[1:], 0, vocab_size))
    u_select, u_kind, random_ids = jax.vmap(row)(example_index_B)
  if word_ids_BxL is not None:
    # One draw per word: word w of a row reads the draw at position w (word ids are < L).
    u_select = jnp.take_along_axis(u_select, jnp.maximum(word_ids_BxL, 0), axis=-1)
  maskable = (attention_mask_BxL > 0) & ~jnp.isin(input_ids_BxL, jnp.asarray(special_ids))
  if word_ids_BxL is not None:
    maskable &= word_ids_BxL >= 0
  chosen = maskable & (u_select < probability)
  labels = jnp.where(chosen, input_ids_BxL, IGNORE_INDEX)
  ids = jnp.where(chosen & (u_kind < 0.8), mask_id, input_ids_BxL)
  ids = jnp.where(chosen & (u_kind >= 0.8) & (u_kind < 0.9), random_ids, ids)
  return ids.astype(input_ids_BxL.dtype), labels


class MaskedLM(Task):
  """BERT-style masked language modelling from a checkpoint, or from scratch (model.from_scratch)."""

  name = "masked_lm"
  auto_class = auto.FlaxAutoModelForMaskedLM
  supports_streaming = True  # data.streaming: the train texts are read on the fly
  # Not labels (those are drawn on device): the word ids whole-word masking needs in the batch.
  label_fields = ("word_ids",)

  def prepare(self, tokenizer):
    from flaxhf.data.mlm import prepare_mlm
    self.special_ids = tuple(sorted(set(tokenizer.all_special_ids)))
    self.mask_id = int(tokenizer.mask_token_id)
    self.tokenizer_size = len(tokenizer)
    return prepare_mlm(self.cfg.data, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())

  def configure_model(self, config, task_data):
    if self.tokenizer_size > config.vocab_size:
      if not self.cfg.model.from_scratch:
        raise ValueError(f"The tokenizer has {self.tokenizer_size} tokens but the checkpoint embeds "
                         f"{config.vocab_size}: they do not belong together.")
      config.vocab_size = self.tokenizer_size  # from scratch: size the embeddings to the tokenizer
    positions = config.max_position_embeddings - (
        config.pad_token_id + 1 if config.model_type == "roberta" else 0)
    if self.cfg.data.max_length > positions:
      raise ValueError(f"data.max_length={self.cfg.data.max_length} exceeds the model's "
                       f"{positions} positions.")
    self.vocab_size = min(self.tokenizer_size, config.vocab_size)

  def device_transform(self, batch, rng, train):
    ids, labels = mask_tokens(
        rng, batch["input_ids"], batch["attention_mask"], self.special_ids, self.mask_id,
        self.vocab_size, float(self.cfg.data.mlm_probability),
        word_ids_BxL=batch.get("word_ids") if self.cfg.data.whole_word_mask else None,
        example_index_B=None if train else batch.get("example_index"))
    return {**batch, "input_ids": ids, "labels": labels}

  def _token_losses(self, outputs, batch):
    labels = batch["labels"]
    valid = labels != IGNORE_INDEX
    per = optax.softmax_cross_entropy_with_integer_labels(outputs.logits.astype(jnp.float32),
                                                          jnp.where(valid, labels, 0))
    return per * valid, valid

  def loss(self, outputs, batch):
    per, valid = self._token_losses(outputs, batch)
    return jnp.sum(per), jnp.sum(valid)

  def predict(self, outputs, batch):
    per, valid = self._token_losses(outputs, batch)
    hit = (jnp.argmax(outputs.logits, -1) == batch["labels"]) & valid
    return {"loss_sum": per.sum(-1), "count": valid.sum(-1), "correct": hit.sum(-1)}

  def metrics(self, predictions, task_data):
    total = {k: float(np.sum([np.asarray(p[k], np.float64) for p in predictions]))
             for k in ("loss_sum", "count", "correct")}
    count = max(total["count"], 1.0)
    loss = total["loss_sum"] / count  # per masked token over the whole split (not batch means)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))),
            "accuracy": total["correct"] / count, "masked_tokens": int(total["count"])}

  @property
  def main_metric(self):
    return "perplexity", "min"
