"""Framework-free (numpy) batching with static shapes for a jit-compiled, multi-host training loop.

Shapes stay static because every batch is padded to one of a few bucket lengths, so XLA compiles
at most `len(buckets)` programs. The batch for global step s is a pure function of (seed, s), so a
resumed run yields exactly the batches an uninterrupted one would have, on every process.
A streamed training set (`ExampleStream`, data bigger than memory) has no step -> row map: its
position is state that the engine keeps in each checkpoint's metadata.
"""

import dataclasses
import itertools
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np

DEFAULT_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

# As transformers' LengthGroupedSampler: sort by length within megabatches of 50 batches.
MEGABATCH_BATCHES = 50

MaxLength = Union[int, Mapping[str, int]]


@dataclasses.dataclass
class Examples:
  """Tokenized examples: `seqs` maps field -> list of int arrays whose LAST axis is the token length
  (variable; multiple choice may be [choices, len]); `values` maps field -> np.ndarray with one row
  per example (labels, example ids)."""

  seqs: Dict[str, List[np.ndarray]]
  values: Dict[str, np.ndarray]
  _lengths: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict, init=False,
                                                      repr=False, compare=False)

  def __post_init__(self):
    self.values = {k: np.asarray(v) for k, v in self.values.items()}
    sizes = {k: len(v) for k, v in {**self.seqs, **self.values}.items()}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"Examples fields differ in length: {sizes}")

  def __len__(self) -> int:
    for v in list(self.seqs.values()) + list(self.values.values()):
      return len(v)
    return 0

  @property
  def primary_field(self) -> str:
    """The field whose length drives bucketing and the attention mask: input_ids if present."""
    return "input_ids" if "input_ids" in self.seqs else next(iter(self.seqs))

  def lengths(self, field: Optional[str] = None) -> np.ndarray:
    """Token count of each example in `field` (default: the primary field), as int64 [N]."""
    field = field or self.primary_field
    if field not in self._lengths:
      self._lengths[field] = np.fromiter((a.shape[-1] for a in self.seqs[field]), np.int64,
                                         count=len(self.seqs[field]))
    return self._lengths[field]

  def select(self, indices: Sequence[int]) -> "Examples":
    """A new Examples with the given rows, in the given order."""
    indices = np.asarray(indices, dtype=np.int64)
    return Examples(seqs={k: [v[i] for i in indices] for k, v in self.seqs.items()},
                    values={k: v[indices] for k, v in self.values.items()})


def check_buckets(buckets) -> tuple:
  """`data.buckets` as a sorted tuple of distinct positive ints; a clear error for anything else.

  An empty tuple (or None) pads every batch to max_length: one program to compile, as TPU users
  running fixed shapes want; `tuple(range(1, max_length + 1))` pads each batch to its longest row.
  """
  values = tuple(buckets or ())
  bad = [b for b in values if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1]
  if bad:
    raise ValueError(f"data.buckets must be positive ints (padded lengths), got {bad}; e.g. "
                     "--config.data.buckets='(64, 128, 256)', or '()' to pad every batch to "
                     "data.max_length.")
  return tuple(sorted({int(b) for b in values}))


def bucket_length(n: int, buckets: Optional[Sequence[int]], max_length: int) -> int:
  """The smallest bucket >= n, capped at max_length; max_length when buckets is empty/None."""
  if n > max_length:
    raise ValueError(f"A sequence of {n} tokens exceeds max_length={max_length}; truncate it "
                     "when tokenizing.")
  fits = [b for b in (buckets or ()) if b >= n]
  return min(min(fits), max_length) if fits else max_length


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the ragged remainder is dropped, differently each epoch)."""
  return num_examples // global_batch_size


def eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global batches needed to cover every example once (the last one padded with dummy rows)."""
  return -(-num_examples // global_batch_size)


def epoch_order(examples: Examples, global_batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False) -> np.ndarray:
  """Example indices [steps_per_epoch, global_batch_size] of one epoch; pure in (seed, epoch)."""
  n, b = len(examples), global_batch_size
  spe = steps_per_epoch(n, b)
  rng = np.random.default_rng((seed, epoch))
  kept = rng.permutation(n)[:spe * b]
  if not group_by_length:
    return kept.reshape(spe, b)
  lengths = examples.lengths()
  mega = MEGABATCH_BATCHES * b
  # Longest first inside each megabatch; the stable sort keeps the random order among equals.
  grouped = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                            for c in np.split(kept, list(range(mega, len(kept), mega)))])
  return grouped.reshape(spe, b)[rng.permutation(spe)]


def train_batches(examples: Examples, *, global_batch_size: int, seed: int, start_step: int = 0,
                  buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, max_length: MaxLength,
                  pad_values: Optional[Mapping[str, int]] = None, process_index: int = 0,
                  process_count: int = 1,
                  group_by_length: bool = False) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite training batches from `start_step`: this process's rows of each global batch.

  Every process pads to the same length: the smallest bucket >= the longest example of the
  global batch. Adds "attention_mask" unless the examples carry their own.
  """
  lo, hi = _process_rows(global_batch_size, process_index, process_count)
  spe = steps_per_epoch(len(examples), global_batch_size)
  if spe == 0:
    raise ValueError(f"{len(examples)} training examples do not fill one global batch of "
                     f"{global_batch_size}.")
  pad_values = dict(pad_values or {})
  order, order_epoch = None, None
  step = start_step
  while True:
    epoch, i = divmod(step, spe)
    if epoch != order_epoch:
      order, order_epoch = epoch_order(examples, global_batch_size, seed, epoch,
                                       group_by_length), epoch
    rows = order[i]
    pad_lens = _pad_lengths(examples, rows, buckets, max_length)
    yield _gather(examples, rows[lo:hi], pad_lens, pad_values)
    step += 1


def eval_batches(examples: Examples, *, global_batch_size: int,
                 buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS, max_length: MaxLength,
                 pad_values: Optional[Mapping[str, int]] = None, process_index: int = 0,
                 process_count: int = 1,
                 sort_by_length: bool = False) -> Iterator[Dict[str, np.ndarray]]:
  """Every example once (in order, or longest first if sort_by_length): this process's rows.

  The ragged last global batch is filled with dummy rows. Adds "example_mask" (1 real, 0 dummy)
  and "example_index" (the row in `examples`, -1 for dummies) so the caller can drop dummies and
  restore order. Dummy rows attend to their first (pad) token so no softmax row is fully masked.
  """
  n, b = len(examples), global_batch_size
  lo, hi = _process_rows(b, process_index, process_count)
  pad_values = dict(pad_values or {})
  order = np.argsort(-examples.lengths(), kind="stable") if sort_by_length else np.arange(n)
  slots = np.full(eval_steps(n, b) * b, -1, dtype=np.int64)
  slots[:n] = order
  for start in range(0, len(slots), b):
    rows = slots[start:start + b]
    pad_lens = _pad_lengths(examples, rows[rows >= 0], buckets, max_length)
    local = rows[lo:hi]
    batch = _gather(examples, local, pad_lens, pad_values)
    if "attention_mask" not in examples.seqs and examples.seqs:
      batch["attention_mask"][local < 0, ..., 0] = 1
    batch["example_mask"] = (local >= 0).astype(np.int32)
    batch["example_index"] = local.astype(np.int32)
    yield batch


def _process_rows(global_batch_size: int, process_index: int, process_count: int):
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  per = global_batch_size // process_count
  return process_index * per, (process_index + 1) * per


def _pad_lengths(examples: Examples, rows: np.ndarray, buckets, max_length: MaxLength):
  """Padded length of each sequence field, from the longest of `rows` (the GLOBAL batch)."""
  pad_lens = {}
  for field in examples.seqs:
    cap = max_length[field] if isinstance(max_length, Mapping) else max_length
    longest = int(examples.lengths(field)[rows].max()) if len(rows) else 0
    pad_lens[field] = bucket_length(longest, buckets, cap)
  return pad_lens


def _gather(examples: Examples, idx: np.ndarray, pad_lens: Dict[str, int],
            pad_values: Dict[str, int]) -> Dict[str, np.ndarray]:
  """Rows `idx` (-1 = dummy row) padded to `pad_lens`; sequence fields int32 unless float."""
  real = idx >= 0
  safe = np.where(real, idx, 0)
  batch = {}
  for field, seq in examples.seqs.items():
    proto = seq[0]
    dtype = proto.dtype if np.issubdtype(proto.dtype, np.floating) else np.int32
    out = np.full((len(idx),) + proto.shape[:-1] + (pad_lens[field],), pad_values.get(field, 0),
                  dtype)
    for j in np.flatnonzero(real):
      a = seq[idx[j]]
      out[j, ..., :a.shape[-1]] = a
    batch[field] = out
  if examples.seqs and "attention_mask" not in examples.seqs:
    shape = batch[examples.primary_field].shape
    lens = np.where(real, examples.lengths()[safe], 0).reshape((-1,) + (1,) * (len(shape) - 1))
    batch["attention_mask"] = np.broadcast_to(np.arange(shape[-1]) < lens, shape).astype(np.int32)
  for field, vals in examples.values.items():
    out = vals[safe]
    out[~real] = 0
    batch[field] = out
  return batch


class ExampleStream:
  """Training examples made on the fly from one process's share of a lazily read text stream.

  `source` yields texts (`iterate(state)`) and tells its position (`state_dict()`): see
  flaxhf.data.sources.TextShare. `encode(texts, carry) -> (seqs, carry)` turns a chunk of texts,
  plus what the previous chunk left over (None at the start of an epoch), into examples: `seqs`
  maps field -> [N, L] array or list of N 1-D arrays; `carry` maps field -> 1-D int array.

  The position is (epoch, the source's position at the start of the current chunk, the carry into
  that chunk, the examples of the chunk already handed out): restoring it re-reads and re-encodes
  one chunk, so the stream continues at exactly the next example. With `shuffle` the examples of a
  chunk come in an order drawn from (seed, epoch, chunk): a window shuffle that a resume repeats.
  The stream loops over the data for as many epochs as it is read; `max_examples` caps an epoch.
  """

  def __init__(self, source, encode, *, chunk_texts: int = 1000, shuffle: bool = False,
               max_examples: Optional[int] = None, where: str = "the training data"):
    if chunk_texts < 1:
      raise ValueError(f"data.stream_chunk_texts={chunk_texts} must be >= 1.")
    self.source, self.encode, self.chunk_texts = source, encode, int(chunk_texts)
    self.shuffle, self.where = shuffle, where
    self.max_examples = None if max_examples is None else int(max_examples)
    self._state: Optional[dict] = None
    self._batch_state: Optional[dict] = None

  def state_dict(self) -> Optional[dict]:
    """The position after the last batch handed out by `batches` (JSON-able); None before any."""
    return self._batch_state

  def examples(self, seed: int, state: Optional[dict] = None) -> Iterator[Dict[str, np.ndarray]]:
    """Examples (field -> 1-D array) from `state` (None: the start), epoch after epoch."""
    state = dict(state or {"epoch": 0, "source": None, "carry": None, "chunk": 0, "skip": 0,
                           "emitted": 0})
    while True:
      epoch, emitted = state["epoch"], state["emitted"]
      chunk_start, chunk, skip = state["source"], state["chunk"], state["skip"]
      carry = _carry_arrays(state["carry"])
      texts_it = self.source.iterate(chunk_start)
      done = False
      while not done:
        texts = list(itertools.islice(texts_it, self.chunk_texts))
        if not texts:
          break
        next_start = self.source.state_dict()
        seqs, next_carry = self.encode(texts, carry)
        n = len(next(iter(seqs.values())))
        order = (np.random.default_rng((seed, epoch, chunk)).permutation(n) if self.shuffle
                 else np.arange(n))
        carry_json = None if carry is None else {k: v.tolist() for k, v in carry.items()}
        for j in range(skip, n):
          if self.max_examples is not None and emitted >= self.max_examples:
            done = True
            break
          emitted += 1
          self._state = {"epoch": epoch, "source": chunk_start, "carry": carry_json,
                         "chunk": chunk, "skip": j + 1, "emitted": emitted}
          yield {k: np.asarray(v[order[j]]) for k, v in seqs.items()}
        chunk_start, carry, chunk, skip = next_start, next_carry, chunk + 1, 0
      if emitted == 0:
        raise ValueError(f"{self.where} gives no training example (this process's share of it "
                         "is too short for one block): give it more text or lower the block "
                         "length.")
      state = {"epoch": epoch + 1, "source": None, "carry": None, "chunk": 0, "skip": 0,
               "emitted": 0}

  def batches(self, *, global_batch_size: int, seed: int, max_length: MaxLength,
              pad_values: Optional[Mapping[str, int]] = None, process_index: int = 0,
              process_count: int = 1,
              state: Optional[dict] = None) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of every global batch, padded to max_length (one shape on every
    process: no process sees the others' rows), from `state` (a `state_dict()`; None: the start)."""
    lo, hi = _process_rows(global_batch_size, process_index, process_count)
    examples = self.examples(seed, state)
    pad_values = dict(pad_values or {})
    while True:
      rows = [next(examples) for _ in range(hi - lo)]
      self._batch_state = self._state
      ex = Examples(seqs={k: [r[k] for r in rows] for k in rows[0]}, values={})
      caps = {k: max_length[k] if isinstance(max_length, Mapping) else max_length for k in rows[0]}
      for k, cap in caps.items():
        longest = int(ex.lengths(k).max())
        if longest > cap:
          raise ValueError(f"A streamed example of {longest} tokens exceeds max_length={cap}.")
      yield _gather(ex, np.arange(len(rows)), caps, pad_values)


def _carry_arrays(carry: Optional[Mapping[str, list]]) -> Optional[Dict[str, np.ndarray]]:
  return None if carry is None else {k: np.asarray(v, np.int32) for k, v in carry.items()}
