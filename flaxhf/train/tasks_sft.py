"""Chat supervised fine-tuning (SFT) on the engine: the next-token loss on the assistant's tokens only,
over conversations rendered with a chat template and packed several to a row (flaxhf.data.chat).

A packed row's `document_ids` become, on device, a [B, L, L] mask under which no token sees another
conversation, and positions that restart at 0 with each conversation; so a packed row's loss and
gradients are the sum of its conversations' run alone. Eval reports the assistant-token loss and
perplexity, and logs the model's greedy replies to a few held-out conversations.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxhf.models.losses import IGNORE_INDEX
from flaxhf.train.tasks_clm import CausalLM, document_mask_and_positions


def sft_labels(labels_BxL, document_ids_BxL):
  """The assistant labels, less each packed conversation's first token (its prediction would read
  the previous conversation, which the mask hides)."""
  doc = document_ids_BxL
  same_as_previous = jnp.concatenate([jnp.zeros_like(doc[:, :1], bool), doc[:, 1:] == doc[:, :-1]], 1)
  return jnp.where(same_as_previous, labels_BxL, IGNORE_INDEX)


class SFT(CausalLM):
  """Chat SFT of a decoder (configs/sft.py): a checkpoint, a local HF folder, or from scratch.
  The loss, predictions and metrics are the causal LM's, over the labels built here."""

  name = "sft"
  supports_streaming = False
  label_fields = ("labels", "document_ids")

  def prepare(self, tokenizer):
    from flaxhf.data.chat import chat_template, prepare_chat
    self.tokenizer = tokenizer
    self.template = chat_template(tokenizer, self.cfg.data)
    return prepare_chat(self.cfg.data, tokenizer)

  def configure_model(self, config, task_data):
    super().configure_model(config, task_data)
    if getattr(config, "pad_token_id", None) is None:
      pad = self.tokenizer.pad_token_id
      config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

  def device_transform(self, batch, rng, train):
    doc = batch["document_ids"]
    mask, positions = document_mask_and_positions(doc, batch["attention_mask"])
    return {**batch, "labels": sft_labels(batch["labels"], doc), "attention_mask": mask,
            "position_ids": positions}

  def samples(self, model, params, task_data):
    """Greedy replies to the first few held-out conversations (prompts left-padded together)."""
    from flaxhf.data.chat import generation_prompt
    ev = self.cfg.get("eval")
    n = int(ev.num_samples) if ev is not None else 0
    if n <= 0 or not task_data.eval_raw or not hasattr(model, "generate"):
      return []
    conversations = task_data.eval_raw[:n]
    prompts = [generation_prompt(self.tokenizer, c, self.template) for c in conversations]
    width = max(len(p) for p in prompts)
    pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
    ids = np.full((len(prompts), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
      ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = model.generate(ids, attention_mask=mask, params=params, do_sample=False,
                         max_new_tokens=int(ev.max_new_tokens), pad_token_id=pad,
                         eos_token_id=self.tokenizer.eos_token_id)
    sequences = np.asarray(jax.device_get(out.sequences))[:, width:]
    return [{"prompt": self.tokenizer.decode(p), "generated": self.tokenizer.decode(
        s, skip_special_tokens=True)} for p, s in zip(prompts, sequences)]
