"""Run logging on process 0: metrics.jsonl, TensorBoard events and a progress bar."""

import collections
import json
import logging
import os
import time

import jax

log = logging.getLogger("flaxhf")


class RunLogger:
  """Writes one JSON object per log/eval event; other processes write nothing.

  JAX dispatches steps asynchronously, so "dispatched" runs ahead of "done". The bar and tokens/s
  count a step only once its metrics are ready on device, in step order; and the host waits for
  step s - max_in_flight before going on, so it never queues more than that many steps (enough to
  keep the device busy while the host builds the next batch, and the bar lags by at most that).
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int, progress_bar: bool = True,
               max_in_flight: int = 2):
    self.active = jax.process_index() == 0
    self.total, self.last_time, self.last_step = total_steps, None, start_step
    self.tokens = 0  # tokens of the steps completed since the clock last started
    self.completed = start_step  # the last step whose metrics are ready
    self.max_in_flight = max_in_flight
    self._in_flight = collections.deque()  # (step, tokens, metric arrays), oldest first
    self._next_tokens = 0
    self._bar = self._tb = self._file = None
    if not self.active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    if start_step and os.path.exists(path):
      _drop_rows_after(path, start_step)  # a resumed run redoes those steps
    self._file = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard events.")
    if progress_bar:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

  def count_tokens(self, n: int):
    """Adds `n` tokens to the step about to be dispatched (counted when that step completes)."""
    self._next_tokens += n

  def reset_clock(self, step: int):
    """Restarts the throughput clock after a pause (eval, checkpoint, compilation)."""
    self._retire(keep=0)
    self.last_time, self.last_step, self.tokens = time.perf_counter(), step, 0

  def step_done(self, step: int, metrics):
    """Registers dispatched step `step` by its output `metrics` (a pytree of jax arrays)."""
    self._in_flight.append((step, self._next_tokens, jax.tree_util.tree_leaves(metrics)))
    self._next_tokens = 0
    self._retire(keep=self.max_in_flight)

  def _retire(self, keep: int):
    """Counts finished steps in order, waiting for the oldest while more than `keep` are queued."""
    while self._in_flight:
      step, tokens, arrays = self._in_flight[0]
      if len(self._in_flight) > keep:
        for a in arrays:
          a.block_until_ready()
      elif not all(a.is_ready() for a in arrays):
        break
      self._in_flight.popleft()
      self.tokens += tokens
      self.completed = step
    if self._bar is not None and self.completed > self._bar.n:
      self._bar.update(self.completed - self._bar.n)

  def train(self, step: int, metrics: dict):
    """Logs train metrics; adds tokens/s of the steps completed since the last train log."""
    self._retire(keep=0)
    now = time.perf_counter()
    if self.last_time is not None and step > self.last_step:
      metrics["tokens_per_sec"] = self.tokens / (now - self.last_time)
      metrics["steps_per_sec"] = (step - self.last_step) / (now - self.last_time)
    self.last_time, self.last_step, self.tokens = now, step, 0
    self.write("train", step, metrics)
    if self._bar is not None:
      post = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
      if "tokens_per_sec" in metrics:
        post["tok/s"] = f"{metrics['tokens_per_sec']:.0f}"
      self._bar.set_postfix(post)

  def write(self, kind: str, step: int, metrics: dict):
    if not self.active:
      return
    record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(f"{kind}/{k}", v, step)
    if kind != "train" or self._bar is None:
      summary = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items() if k != "kind")
      (self._bar.write if self._bar is not None else log.info)(f"[{kind}] {summary}")

  def close(self):
    self._retire(keep=0)
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._file is not None:
      self._file.close()


def _drop_rows_after(path: str, step: int):
  """Keeps the metrics.jsonl rows up to `step`: a killed run may have logged past its checkpoint."""
  with open(path) as f:
    rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(rows)
  os.replace(tmp, path)


def _plain(v):
  try:
    return v.item() if hasattr(v, "item") else v
  except (TypeError, ValueError):
    return v
