"""Causal language modelling on the engine: next-token loss over blocks, perplexity, sample generations.

Labels are the input ids; the loss shifts them (logits at t score token t + 1), as transformers'
GPT2LMHeadModel does. With `data.per_document_attention` each block's `document_ids` become, on
device, a [B, L, L] mask (a token attends to the earlier tokens of its own document; the model adds
causality) and positions that restart at 0 with every document. The first token of a document then
has no label: predicting it would score document B's first token from document A's tokens, which the
mask has just made invisible. A block that starts inside a document starts its positions at 0.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxhf.models import auto, io
from flaxhf.models.losses import IGNORE_INDEX, next_token_labels
from flaxhf.train.tasks import Task

log = logging.getLogger("flaxhf")


def document_mask_and_positions(document_ids_BxL, attention_mask_BxL):
  """([B, L, L] mask: query i may see key j of its own document, [B, L] positions per document)."""
  doc = document_ids_BxL
  same_BxLxL = doc[:, :, None] == doc[:, None, :]
  # Keys only: every query row keeps itself (or, for a padded row, its first token) visible.
  mask_BxLxL = same_BxLxL & (attention_mask_BxL[:, None, :] > 0)
  index_L = jnp.arange(doc.shape[1])
  starts_BxL = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
  first_BxL = jax.lax.cummax(jnp.where(starts_BxL, index_L, 0), axis=1)
  return mask_BxLxL.astype(jnp.int32), (index_L - first_BxL).astype(jnp.int32)


def clm_labels(input_ids_BxL, attention_mask_BxL, document_ids_BxL=None):
  """Unshifted labels [B, L]: the ids, -100 on padding and (per document) on each document's start."""
  valid = attention_mask_BxL > 0
  if document_ids_BxL is not None:
    doc = document_ids_BxL
    valid &= jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] == doc[:, :-1]], axis=1)
  return jnp.where(valid, input_ids_BxL, IGNORE_INDEX)


def shifted_token_losses(logits_BxLxV, labels_BxL):
  """(per-token loss [B, L], valid [B, L]): logits at t against the label at t + 1."""
  labels = next_token_labels(labels_BxL)
  valid = labels != IGNORE_INDEX
  per = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), jnp.where(valid, labels, 0))
  return per * valid, valid


class CausalLM(Task):
  """GPT-2-style language modelling from a checkpoint or from scratch (model.config_name)."""

  name = "causal_lm"
  auto_class = auto.FlaxAutoModelForCausalLM
  supports_streaming = True  # data.streaming: the train texts are read on the fly
  model_inputs = ("input_ids", "attention_mask")
  label_fields = ("document_ids",)  # labels are built on device from the ids

  def prepare(self, tokenizer):
    from flaxhf.data.clm import prepare_clm
    self.tokenizer = tokenizer
    return prepare_clm(self.cfg.data, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())

  def configure_model(self, config, task_data):
    size = len(self.tokenizer)
    if size > config.vocab_size:
      if not self.cfg.model.from_scratch:
        raise ValueError(f"The tokenizer has {size} tokens but the checkpoint embeds "
                         f"{config.vocab_size}: they do not belong together. Use the checkpoint's "
                         "own tokenizer (model.tokenizer), or train from scratch "
                         "(model.from_scratch=True sizes the embeddings to the tokenizer).")
      config.vocab_size = size
    elif size < config.vocab_size and self._defaults_from_model_type():
      # model.config_name=llama comes with transformers' 32000: a tokenizer trained here
      # (launch/train_tokenizer.py --family gpt2) sizes the embeddings instead. A checkpoint's own
      # config keeps its size (many pad their vocabulary past the tokenizer's).
      config.vocab_size = size
    positions = config.max_position_embeddings
    block = int(self.cfg.data.block_size)
    if block > positions:
      # The config's own key for it (GPT-2: n_positions).
      name = getattr(config, "attribute_map", {}).get("max_position_embeddings", "max_position_embeddings")
      fix = (f"raise it with model.config_overrides='{name}={block}'"
             if self.cfg.model.from_scratch else "the checkpoint cannot see further back")
      raise ValueError(f"data.block_size={block} exceeds the model's {positions} positions "
                       f"({name}): lower data.block_size to at most {positions}, or {fix}.")
    if self.cfg.model.from_scratch:  # generation stops at the tokenizer's EOS, not the config's
      for name in ("bos_token_id", "eos_token_id"):
        if getattr(self.tokenizer, name) is not None:
          setattr(config, name, getattr(self.tokenizer, name))

  def _defaults_from_model_type(self):
    """From scratch on transformers' defaults for a model type (model.config_name=llama), with no
    vocab_size set in model.config_overrides."""
    m = self.cfg.model
    return (bool(m.from_scratch) and io.names_a_model_type(m.get("config_name"))
            and "vocab_size=" not in str(m.get("config_overrides") or ""))

  @property
  def per_document(self):
    return bool(self.cfg.data.per_document_attention)

  def device_transform(self, batch, rng, train):
    doc = batch.get("document_ids") if self.per_document else None
    out = {**batch, "labels": clm_labels(batch["input_ids"], batch["attention_mask"], doc)}
    if doc is not None:
      out["attention_mask"], out["position_ids"] = document_mask_and_positions(
          doc, batch["attention_mask"])
    return out

  def loss(self, outputs, batch):
    per, valid = shifted_token_losses(outputs.logits, batch["labels"])
    return jnp.sum(per), jnp.sum(valid)

  def predict(self, outputs, batch):
    per, valid = shifted_token_losses(outputs.logits, batch["labels"])
    hit = (jnp.argmax(outputs.logits, -1) == next_token_labels(batch["labels"])) & valid
    return {"loss_sum": per.sum(-1), "count": valid.sum(-1), "correct": hit.sum(-1)}

  def metrics(self, predictions, task_data):
    total = {k: float(np.sum([np.asarray(p[k], np.float64) for p in predictions]))
             for k in ("loss_sum", "count", "correct")}
    count = max(total["count"], 1.0)
    loss = total["loss_sum"] / count  # per predicted token over the whole split (not batch means)
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))),
            "accuracy": total["correct"] / count, "tokens": int(total["count"])}

  @property
  def main_metric(self):
    return "perplexity", "min"

  def samples(self, model, params, task_data):
    """Greedy continuations of the starts of a few evenly spaced eval blocks."""
    ev = self.cfg.get("eval")
    n = int(ev.num_samples) if ev is not None else 0
    if n <= 0 or task_data.eval is None or not hasattr(model, "generate"):
      return []
    blocks = task_data.eval.seqs["input_ids"]
    rows = np.linspace(0, len(blocks) - 1, min(n, len(blocks))).astype(int)
    prompts = np.stack([blocks[r][:int(ev.prompt_tokens)] for r in rows])
    out = model.generate(prompts, attention_mask=np.ones_like(prompts), params=params,
                         max_new_tokens=int(ev.max_new_tokens), do_sample=False)
    sequences = np.asarray(jax.device_get(out.sequences))
    return [{"prompt": self.tokenizer.decode(p), "generated": self.tokenizer.decode(
        s[prompts.shape[1]:])} for p, s in zip(prompts, sequences)]
