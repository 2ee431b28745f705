"""Greedy, sampling and beam search as single `lax.while_loop`s over a static cache.

A family supplies `step(params, tokens_B, state) -> (logits_BxV, state)`; everything here is pure
and traced inside one jit. Lengths are logical, as transformers counts them: the `sequences_BxS`
buffer holds the prompt in slots [0, prompt_len) and each new token at slot cur_len, whatever
padding the model's own inputs were given to share a compiled program.

Beam search follows transformers' vectorised `_beam_search` step for step (top 2k continuations,
running vs finished beams, the early-stopping heuristic), so it picks the same tokens.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

_NEG = -1.0e9  # transformers' "impossible" score in beam search


class Lengths(NamedTuple):
  """Traced lengths of one call: the prompt's, and the most tokens a sequence may reach."""

  prompt_len: jax.Array
  max_length: jax.Array


def _write_column(buf_BxS, col_B, index):
  return jax.lax.dynamic_update_slice_in_dim(buf_BxS, col_B[:, None].astype(buf_BxS.dtype), index,
                                             axis=1)


def _is_eos(tokens, eos_ids):
  if eos_ids is None or eos_ids.shape[0] == 0:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, eos_ids)


def decode(step: Callable, params, logits_BxV, state, sequences_BxS, lengths: Lengths,
           process: Callable, *, do_sample: bool, rng, pad_id, eos_ids,
           max_new_tokens: int, output_scores: bool):
  """Greedy or sampled decoding. Returns (sequences, final cur_len, scores [N, B, V] or None)."""
  batch, vocab = logits_BxV.shape
  scores = jnp.zeros((max_new_tokens, batch, vocab), jnp.float32) if output_scores else None

  def cond(c):
    return (c["cur_len"] < lengths.max_length) & jnp.any(c["unfinished"])

  def body(c):
    cur_len = c["cur_len"]
    processed = process(c["logits"], c["sequences"], cur_len)
    if do_sample:
      key = jax.random.fold_in(rng, cur_len)
      tokens = jax.random.categorical(key, processed, axis=-1)
    else:
      tokens = jnp.argmax(processed, axis=-1)
    # Finished rows continue with padding, as transformers' _sample.
    tokens = jnp.where(c["unfinished"], tokens, pad_id).astype(jnp.int32)
    out = dict(c, sequences=_write_column(c["sequences"], tokens, cur_len), cur_len=cur_len + 1,
               unfinished=c["unfinished"] & ~_is_eos(tokens, eos_ids))
    if output_scores:
      out["scores"] = jax.lax.dynamic_update_index_in_dim(
          c["scores"], processed, cur_len - lengths.prompt_len, axis=0)
    # The model runs on the chosen token even after the last one: one spare step keeps the loop
    # body free of control flow.
    out["logits"], out["state"] = step(params, tokens, c["state"])
    return out

  carry = dict(logits=logits_BxV.astype(jnp.float32), state=state, sequences=sequences_BxS,
               cur_len=lengths.prompt_len, unfinished=jnp.ones((batch,), bool))
  if output_scores:
    carry["scores"] = scores
  carry = jax.lax.while_loop(cond, body, carry)
  return carry["sequences"], carry["cur_len"], carry.get("scores")


def _gather_beams(x_BxKx, index_BxN):
  """x[b, index[b, n], ...] for a [B, K, ...] array."""
  return jnp.take_along_axis(x_BxKx, index_BxN.reshape(index_BxN.shape + (1,) * (x_BxKx.ndim - 2)),
                             axis=1)


def reorder_state(state, index_N, skip=None):
  """Selects rows `index_N` of every batched array of a decode state (a KV cache, masks), except the
  leaves flagged in `skip` (a list in tree_leaves order)."""
  leaves, treedef = jax.tree_util.tree_flatten(state)
  skip = skip or [False] * len(leaves)
  return jax.tree_util.tree_unflatten(treedef, [
      x if s or jnp.ndim(x) == 0 else jnp.take(x, index_N, axis=0) for x, s in zip(leaves, skip)])


def unchanged_by_step(step: Callable, params, state, batch: int):
  """Flags (in tree_leaves order) the state leaves that `step` returns as it got them: the encoder's
  cross-attention keys and values, the masks. These are the prefill's, computed from each source's
  rows repeated once per beam, so all beams of a source hold the same rows and reordering within a
  source leaves them unchanged; skipping them saves a gather and a copy of each per step (on CPU,
  memory traffic of the order of the decoder's own). Found by tracing `step` once more, abstractly."""
  flags = []

  def probe(params, state):
    _, new = step(params, jnp.zeros((batch,), jnp.int32), state)
    flags[:] = [a is b for a, b in zip(jax.tree_util.tree_leaves(state),
                                       jax.tree_util.tree_leaves(new))]
    return jnp.zeros(())

  jax.eval_shape(probe, params, state)
  return flags


def beam_search(step: Callable, params, logits_NxV, state, sequences_BxS, lengths: Lengths,
                process: Callable, *, num_beams: int, length_penalty, early_stopping: Any,
                eos_ids, max_new_tokens: int, output_scores: bool, do_sample: bool = False, rng=None,
                reorder: Optional[Callable] = None):
  """transformers' beam search. Inputs are already expanded to N = batch * num_beams rows.

  `sequences_BxS` (here [N, S]) holds each prompt with the fill id after it. Returns (sequences
  [B, K, S], sequence scores [B, K], beam indices [B, K, max_new_tokens], final cur_len, scores
  [max_new_tokens, N, V] or None), best beam first. With `do_sample` the `keep` continuations are
  drawn without replacement (Gumbel top-k, the distribution of torch.multinomial's draw).
  """
  n, vocab = logits_NxV.shape
  if reorder is None:
    skip = unchanged_by_step(step, params, state, n)
    reorder = lambda state, index_N: reorder_state(state, index_N, skip)  # noqa: E731
  batch, k = n // num_beams, num_beams
  seq_len = sequences_BxS.shape[-1]
  n_eos = 0 if eos_ids is None else eos_ids.shape[0]
  keep = max(2, 1 + n_eos) * k  # enough continuations that k stay open when the best k end
  top_k_mask = jnp.arange(keep) < k
  length_penalty = jnp.asarray(length_penalty, jnp.float32)
  running = sequences_BxS.reshape(batch, k, seq_len)

  def check_early_stop(unsatisfied, running_scores, beam_scores, finished, cur_len):
    if early_stopping == "never":
      best_len = jnp.where(length_penalty > 0.0, lengths.max_length, cur_len) - lengths.prompt_len
    else:
      best_len = cur_len - lengths.prompt_len
    best_running = running_scores[:, :1] / (best_len.astype(jnp.float32) ** length_penalty)
    worst_finished = jnp.where(finished, jnp.min(beam_scores, axis=1, keepdims=True), _NEG)
    return unsatisfied & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)

  def cond(c):
    return ~c["done"]

  def body(c):
    cur_len = c["cur_len"]
    flat_running = c["running"].reshape(n, seq_len)
    log_probs = jax.nn.log_softmax(c["logits"], axis=-1)
    log_probs = process(log_probs, flat_running, cur_len)
    out = {}
    if output_scores:
      out["scores"] = jax.lax.dynamic_update_index_in_dim(c["scores"], log_probs,
                                                          cur_len - lengths.prompt_len, axis=0)
    acc = (log_probs.reshape(batch, k, vocab) + c["running_scores"][:, :, None]).reshape(batch, -1)

    # Top `keep` continuations over all beams.
    if do_sample:
      gumbel = jax.random.gumbel(jax.random.fold_in(rng, cur_len), acc.shape)
      topk_indices = jax.lax.top_k(jnp.where(jnp.isneginf(acc), -jnp.inf, acc + gumbel), keep)[1]
      topk_log_probs = jnp.take_along_axis(acc, topk_indices, axis=1)
      order = jnp.argsort(-topk_log_probs, axis=1, stable=True)
      topk_log_probs = jnp.take_along_axis(topk_log_probs, order, axis=1)
      topk_indices = jnp.take_along_axis(topk_indices, order, axis=1)
    else:
      topk_log_probs, topk_indices = jax.lax.top_k(acc, keep)
    topk_beam = topk_indices // vocab
    topk_ids = (topk_indices % vocab).astype(jnp.int32)
    step_index = cur_len - lengths.prompt_len
    topk_running = _gather_beams(c["running"], topk_beam)
    topk_running = jax.lax.dynamic_update_slice_in_dim(topk_running, topk_ids[:, :, None], cur_len,
                                                       axis=2)
    topk_indices_hist = _gather_beams(c["running_indices"], topk_beam)
    flat_beam = (topk_beam + jnp.arange(batch)[:, None] * k).astype(jnp.int32)
    topk_indices_hist = jax.lax.dynamic_update_slice_in_dim(topk_indices_hist, flat_beam[:, :, None],
                                                            step_index, axis=2)

    # Which continuations stop here (max length or an EOS token).
    hits = (cur_len + 1 >= lengths.max_length) | _is_eos(topk_ids, eos_ids)

    # Running beams for the next step: the best k that did not stop.
    topk_running_log_probs = topk_log_probs + hits.astype(jnp.float32) * _NEG
    next_index = jax.lax.top_k(topk_running_log_probs, k)[1]
    running = _gather_beams(topk_running, next_index)
    running_scores = _gather_beams(topk_running_log_probs, next_index)
    running_indices = _gather_beams(topk_indices_hist, next_index)

    # Finished beams: merge the new finished ones (length-penalised) into the best k so far.
    just_finished = hits & top_k_mask[None, :]
    finished_scores = topk_log_probs / ((cur_len + 1 - lengths.prompt_len).astype(jnp.float32)
                                        ** length_penalty)
    full = jnp.all(c["finished"], axis=-1, keepdims=True) & (early_stopping is True)
    finished_scores = (finished_scores + full.astype(jnp.float32) * _NEG
                       + (~c["unsatisfied"]).astype(jnp.float32) * _NEG
                       + (~just_finished).astype(jnp.float32) * _NEG)
    merged_scores = jnp.concatenate([c["beam_scores"], finished_scores], axis=1)
    merged_index = jax.lax.top_k(merged_scores, k)[1]
    sequences = _gather_beams(jnp.concatenate([c["sequences"], topk_running], axis=1), merged_index)
    beam_scores = _gather_beams(merged_scores, merged_index)
    beam_indices = _gather_beams(jnp.concatenate([c["beam_indices"], topk_indices_hist], axis=1),
                                 merged_index)
    finished = _gather_beams(jnp.concatenate([c["finished"], just_finished], axis=1), merged_index)

    # The cache follows the beams that go on; then the model runs on their new tokens.
    origin = jax.lax.dynamic_index_in_dim(running_indices, step_index, axis=2,
                                          keepdims=False).reshape(n)
    state = reorder(c["state"], origin)
    next_tokens = jax.lax.dynamic_index_in_dim(running, cur_len, axis=2, keepdims=False).reshape(n)
    logits, state = step(params, next_tokens, state)

    cur_len = cur_len + 1
    unsatisfied = check_early_stop(c["unsatisfied"], running_scores, beam_scores, finished, cur_len)
    go_on = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True))
             & ~jnp.all(hits))
    out.update(logits=logits.astype(jnp.float32), state=state, running=running,
               running_scores=running_scores, running_indices=running_indices,
               sequences=sequences, beam_scores=beam_scores, beam_indices=beam_indices,
               finished=finished, unsatisfied=unsatisfied, cur_len=cur_len, done=~go_on)
    return out

  # Only the first beam starts live, so the k beams do not all pick the same first tokens.
  running_scores = jnp.zeros((batch, k), jnp.float32).at[:, 1:].set(_NEG)
  indices = jnp.full((batch, k, max_new_tokens), -1, jnp.int32)
  carry = dict(logits=logits_NxV.astype(jnp.float32), state=state, running=running,
               running_scores=running_scores, running_indices=indices,
               sequences=running,
               beam_scores=jnp.full((batch, k), _NEG, jnp.float32), beam_indices=indices,
               finished=jnp.zeros((batch, k), bool), unsatisfied=jnp.ones((batch, 1), bool),
               cur_len=lengths.prompt_len, done=jnp.asarray(False))
  if output_scores:
    carry["scores"] = jnp.zeros((max_new_tokens, n, vocab), jnp.float32)
  carry = jax.lax.while_loop(cond, body, carry)
  return (carry["sequences"], carry["beam_scores"], carry["beam_indices"], carry["cur_len"],
          carry.get("scores"))
