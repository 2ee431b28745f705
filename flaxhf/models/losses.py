"""The losses transformers computes for each head, as pure JAX functions (labels of -100 ignored)."""

import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def masked_cross_entropy(logits_NxC, labels_N, ignore_index=IGNORE_INDEX):
  """Mean cross entropy over labels != ignore_index (torch.nn.CrossEntropyLoss)."""
  valid = labels_N != ignore_index
  safe = jnp.where(valid, labels_N, 0)
  per = optax.softmax_cross_entropy_with_integer_labels(logits_NxC.astype(jnp.float32), safe)
  return jnp.sum(per * valid) / jnp.maximum(valid.sum(), 1)


def sequence_classification_loss(logits_BxC, labels, problem_type=None):
  """The loss `XForSequenceClassification` uses: MSE, cross entropy or BCE-with-logits."""
  num_labels = logits_BxC.shape[-1]
  if problem_type is None:
    if num_labels == 1:
      problem_type = "regression"
    elif jnp.issubdtype(labels.dtype, jnp.integer):
      problem_type = "single_label_classification"
    else:
      problem_type = "multi_label_classification"
  logits = logits_BxC.astype(jnp.float32)
  if problem_type == "regression":
    labels = labels.astype(jnp.float32)
    pred = logits.squeeze(-1) if num_labels == 1 else logits
    return jnp.mean(jnp.square(pred - labels.reshape(pred.shape)))
  if problem_type == "single_label_classification":
    return masked_cross_entropy(logits.reshape(-1, num_labels), labels.reshape(-1))
  if problem_type == "multi_label_classification":
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
  raise ValueError(f"Unknown problem_type {problem_type!r}; use 'regression', "
                   "'single_label_classification' or 'multi_label_classification'.")


def token_classification_loss(logits_BxLxC, labels_BxL):
  return masked_cross_entropy(logits_BxLxC.reshape(-1, logits_BxLxC.shape[-1]), labels_BxL.reshape(-1))


def question_answering_loss(start_logits_BxL, end_logits_BxL, start_positions_B, end_positions_B):
  """Mean of start and end cross entropy; positions outside the sequence are ignored (as transformers)."""
  seq_len = start_logits_BxL.shape[-1]
  start = jnp.clip(start_positions_B.reshape(-1), 0, seq_len)
  end = jnp.clip(end_positions_B.reshape(-1), 0, seq_len)
  start_loss = masked_cross_entropy(start_logits_BxL, start, ignore_index=seq_len)
  end_loss = masked_cross_entropy(end_logits_BxL, end, ignore_index=seq_len)
  return (start_loss + end_loss) / 2


def lm_loss(logits_BxLxV, labels_BxL):
  return masked_cross_entropy(logits_BxLxV.reshape(-1, logits_BxLxV.shape[-1]), labels_BxL.reshape(-1))


def next_token_labels(labels_BxL):
  """Labels shifted left [B, L]: position t holds label t + 1; the last position is ignored.

  Causal-LM losses shift the labels, not the logits: slicing [B, L-1, V] logits copies them and
  the slice's gradient pads them back (1.5 s of GPT-2 small's ~18 s train step on 2 cores).
  """
  pad = jnp.full_like(labels_BxL[:, :1], IGNORE_INDEX)
  return jnp.concatenate([labels_BxL[:, 1:], pad], axis=1)


def causal_lm_loss(logits_BxLxV, labels_BxL):
  """transformers' causal-LM loss: position t predicts label t+1 (labels are the inputs, unshifted)."""
  return lm_loss(logits_BxLxV, next_token_labels(labels_BxL))


def compute_loss(task: str, outputs, labels, config):
  """Dispatches on the head's task; `labels` is an array, or (start, end) positions for QA."""
  if task == "sequence_classification":
    return sequence_classification_loss(outputs.logits, labels, getattr(config, "problem_type", None))
  # seq2seq_lm: the labels line up with the decoder inputs (shifted right), so no shift here.
  if task in ("token_classification", "masked_lm", "seq2seq_lm"):
    return lm_loss(outputs.logits, labels)
  if task == "causal_lm":
    return causal_lm_loss(outputs.logits, labels)
  if task == "multiple_choice":
    return masked_cross_entropy(outputs.logits, labels.reshape(-1))
  if task == "question_answering":
    start, end = labels
    return question_answering_loss(outputs.start_logits, outputs.end_logits, start, end)
  raise ValueError(f"The {task or 'base'} model has no loss; `labels` only applies to heads.")

