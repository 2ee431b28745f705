"""Chat data for supervised fine-tuning: conversations rendered with a chat template, the loss on the
assistant's tokens only, several examples packed into each row.

Rows are JSON lines (or any data source) with a `messages` list of `{"role", "content"}`, or TRL's
prompt/completion form: `prompt` and `completion` as message lists (rendered with the template) or
as plain strings (prompt tokens, then completion tokens and EOS; the loss on the completion).

Which tokens are the assistant's: a template that marks them (`{% generation %}` ...
`{% endgeneration %}`) decides, through transformers' `return_assistant_tokens_mask`; for any other
template, an assistant turn is the text that turn adds after the generation prompt (the rendering of
the conversation through that turn, less the rendering before it with `add_generation_prompt`),
mapped onto tokens by their character offsets. A conversation without an assistant turn has nothing
to learn from: it is skipped and counted in the log.
"""

import logging
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flaxhf.data import sources
from flaxhf.data.batching import Examples
from flaxhf.data.sources import DataError, get_option
from flaxhf.data.text_classification import TaskData
from flaxhf.models.losses import IGNORE_INDEX

log = logging.getLogger("flaxhf")

# A ChatML-style template in plain text that marks the assistant's tokens; assistant turns end in
# the tokenizer's EOS so generation stops there. The local runs' tokenizer (GPT-2's BPE) has none.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + eos_token }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_GENERATION_BLOCK = re.compile(r"{%-?\s*generation\s*-?%}")


def chat_template(tokenizer, data_cfg: Any) -> str:
  """data.chat_template (a template string, a file holding one, or "default"), else the
  tokenizer's own; a clear error when there is neither."""
  given = get_option(data_cfg, "chat_template")
  if given:
    if given == "default":
      return DEFAULT_TEMPLATE
    if "{" not in given:  # a path
      try:
        with open(given) as f:
          return f.read()
      except OSError as e:
        raise DataError(f"data.chat_template={given!r} is neither a Jinja template nor a readable "
                        f"file ({e}).") from e
    return given
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.chat_template
  raise DataError(
      "The tokenizer has no chat template, so conversations cannot be rendered. Pass one with "
      "--config.data.chat_template=TEMPLATE_OR_FILE (a Jinja string or a file holding one), or "
      "data.chat_template=default for flaxhf's ChatML-style template (it marks the assistant's "
      "tokens with {% generation %}).")


def row_messages(row: Dict[str, Any]) -> Tuple[Optional[list], Optional[Tuple[str, str]]]:
  """(messages, None) for a conversation, (None, (prompt, completion)) for plain-text pairs."""
  if "messages" in row and row["messages"] is not None:
    return list(row["messages"]), None
  if "prompt" in row and "completion" in row:
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
      return None, (prompt, completion)
    as_list = lambda m, role: [{"role": role, "content": m}] if isinstance(m, str) else list(m)  # noqa: E731
    return as_list(prompt, "user") + as_list(completion, "assistant"), None
  raise DataError(f"A chat row needs `messages` (a list of {{role, content}}) or `prompt` and "
                  f"`completion`; this one has {sorted(row)}. Rename the columns or convert "
                  "the file.")


def _has_assistant(messages) -> bool:
  return any(m.get("role") == "assistant" for m in messages)


def render(tokenizer, messages: list, template: str) -> Tuple[np.ndarray, np.ndarray]:
  """(token ids [L], assistant mask [L] of 0/1) of one conversation."""
  if _GENERATION_BLOCK.search(template):
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return (np.asarray(out["input_ids"], np.int32), np.asarray(out["assistant_masks"], np.int32))
  text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
  spans = []
  for i, m in enumerate(messages):
    if m.get("role") != "assistant":
      continue
    before = tokenizer.apply_chat_template(messages[:i], chat_template=template, tokenize=False,
                                           add_generation_prompt=True) if i else ""
    through = tokenizer.apply_chat_template(messages[:i + 1], chat_template=template, tokenize=False)
    if not (text.startswith(through) and through.startswith(before)):
      raise DataError("The chat template renders a conversation's prefix differently from the "
                      "conversation itself, so the assistant's tokens cannot be found by prefix: use "
                      "a template that marks them with {% generation %} (data.chat_template).")
    spans.append((len(before), len(through)))
  enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  mask = [int(any(a < end and b > start for a, b in spans)) for start, end in enc["offset_mapping"]]
  return np.asarray(enc["input_ids"], np.int32), np.asarray(mask, np.int32)


def render_pair(tokenizer, prompt: str, completion: str) -> Tuple[np.ndarray, np.ndarray]:
  """A plain-text prompt/completion pair: prompt then completion + EOS; the mask on the latter."""
  if tokenizer.eos_token_id is None:
    raise DataError("Plain-text prompt/completion rows end the completion with EOS, and the "
                    "tokenizer has none: set model.tokenizer to one that has an eos_token.")
  p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  return np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32)


def pack(examples: List[Tuple[np.ndarray, np.ndarray]], block_size: int, packing: bool) -> Examples:
  """Examples (ids, assistant mask) into rows: labels are the ids on assistant tokens, -100 elsewhere.

  With packing, examples fill rows of up to block_size tokens in order (one that does not fit
  starts the next row); `document_ids` number them within each row (all 0 unpacked) and the
  attention never crosses them (the task builds the mask). Longer examples are truncated.
  """
  rows: Dict[str, list] = {"input_ids": [], "labels": [], "document_ids": []}
  current: List[Tuple[np.ndarray, np.ndarray]] = []

  def flush():
    if current:
      rows["input_ids"].append(np.concatenate([ids for ids, _ in current]))
      rows["labels"].append(np.concatenate([np.where(m > 0, ids, IGNORE_INDEX) for ids, m in current]))
      rows["document_ids"].append(np.concatenate(
          [np.full(len(ids), d, np.int32) for d, (ids, _) in enumerate(current)]))
      current.clear()

  used = 0
  for ids, mask in examples:
    ids, mask = ids[:block_size], mask[:block_size]
    if not packing or used + len(ids) > block_size:
      flush()
      used = 0
    current.append((ids, mask))
    used += len(ids)
  flush()
  return Examples(seqs={k: [np.asarray(a, np.int32) for a in v] for k, v in rows.items()},
                  values={})


def tokenize_rows(tokenizer, rows, template: str, role: str) -> Tuple[list, list]:
  """(examples [(ids, mask)], conversations kept) of one split; skipped rows are counted."""
  examples, kept, skipped = [], [], 0
  for row in rows:
    messages, pair = row_messages(row)
    if pair is not None:
      examples.append(render_pair(tokenizer, *pair))
      kept.append(pair)
      continue
    if not _has_assistant(messages):
      skipped += 1
      continue
    ids, mask = render(tokenizer, messages, template)
    if not mask.any():
      raise DataError("The chat template renders the assistant's turns without marking any token "
                      "(its {% generation %} block is empty or misplaced): fix data.chat_template.")
    examples.append((ids, mask))
    kept.append(messages)
  if skipped:
    log.warning("SFT %s: skipped %d of %d conversations without an assistant turn (nothing to "
                "learn from them).", role, skipped, skipped + len(kept))
  if not examples:
    raise DataError(f"The SFT {role} data has no conversation with an assistant turn.")
  return examples, kept


def prepare_chat(data_cfg: Any, tokenizer) -> TaskData:
  """Loads, renders and packs the configured splits."""
  template = chat_template(tokenizer, data_cfg)
  block = int(get_option(data_cfg, "max_length", 1024))
  packing = bool(get_option(data_cfg, "packing", True))
  limits = {"train": get_option(data_cfg, "max_train_samples"),
            "validation": get_option(data_cfg, "max_eval_samples")}
  out, raw_eval = {}, None
  for role, ds in sources.load_splits(data_cfg).items():
    if limits[role] is not None:
      ds = ds.select(range(min(int(limits[role]), ds.num_rows)))
    examples, kept = tokenize_rows(tokenizer, ds, template, role)
    out[role] = pack(examples, block, packing and role == "train")
    if role == "validation":
      raw_eval = kept
    tokens = sum(len(ids) for ids, _ in examples)
    trained = sum(int(m.sum()) for _, m in examples)
    log.info("SFT %s: %d conversations, %d tokens (%d assistant) -> %d rows of <= %d%s.", role,
             len(examples), tokens, trained, len(out[role]), block, " (packed)" if packing and
             role == "train" else "")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return TaskData(train=out.get("train"), eval=out.get("validation"), label_list=None,
                  num_labels=0, problem_type="causal_lm", eval_raw=raw_eval,
                  pad_values={"input_ids": 0 if pad_id is None else int(pad_id),
                              "labels": IGNORE_INDEX, "document_ids": -1})


def generation_prompt(tokenizer, conversation, template: str) -> np.ndarray:
  """The ids of a held-out conversation up to its last assistant turn, ready for the reply."""
  if isinstance(conversation, tuple):  # a plain-text pair
    return np.asarray(tokenizer(conversation[0], add_special_tokens=False)["input_ids"], np.int32)
  last = max(i for i, m in enumerate(conversation) if m.get("role") == "assistant")
  ids = tokenizer.apply_chat_template(conversation[:last], chat_template=template, tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
  return np.asarray(ids, np.int32)
