"""Token classification ("ner"), as transformers' TokenClassificationPipeline, grouping rules included."""

import warnings

import numpy as np

from flaxhf.pipelines.base import Pipeline, as_list
from flaxhf.pipelines.text_classification import softmax

STRATEGIES = ("none", "simple", "first", "average", "max")


def get_tag(label):
  """("B" | "I", tag) of a label; labels without a B-/I- prefix continue ("I") their tag."""
  if label.startswith(("B-", "I-")):
    return label[0], label[2:]
  return "I", label


def merge_overlapping(entities):
  """Entities of overlapping stride windows: of two that overlap, keep the longer (then higher score)."""
  if not entities:
    return entities
  entities = sorted(entities, key=lambda e: e["start"])
  merged, prev = [], entities[0]
  for e in entities:
    if prev["start"] <= e["start"] < prev["end"]:
      e_len, prev_len = e["end"] - e["start"], prev["end"] - prev["start"]
      if e_len > prev_len or e_len == prev_len and e["score"] > prev["score"]:
        prev = e
    else:
      merged.append(prev)
      prev = e
  merged.append(prev)
  return merged


class TokenClassificationPipeline(Pipeline):
  """Labels tokens, or with `aggregation_strategy` groups them into entities ({"entity_group", ...})."""

  task = "token-classification"
  model_task = "token_classification"
  defaults = dict(aggregation_strategy="none", ignore_labels=None, stride=None)
  too_long_hint = "The tokenizer's model_max_length exceeds the model's; lower it, or pass stride=."

  def check_params(self, p):
    strategy = str(getattr(p["aggregation_strategy"], "value", p["aggregation_strategy"])).lower()
    if strategy not in STRATEGIES:
      raise ValueError(f"aggregation_strategy must be one of {STRATEGIES}; got {strategy!r}.")
    p["aggregation_strategy"] = strategy
    if strategy in ("first", "average", "max") and not self.tokenizer.is_fast:
      raise ValueError(f"aggregation_strategy={strategy!r} needs word boundaries, which slow tokenizers "
                       "lack: use 'simple' or a fast tokenizer.")
    if p["stride"] is not None:
      if p["stride"] >= self.tokenizer.model_max_length:
        raise ValueError(f"stride={p['stride']} must be less than the tokenizer's model_max_length "
                         f"({self.tokenizer.model_max_length}), minus its special tokens.")
      if strategy == "none":
        raise ValueError("stride= splits long texts into windows whose entities are then merged, which "
                         "needs an aggregation_strategy other than 'none'.")
      if not self.tokenizer.is_fast:
        raise ValueError("stride= needs a fast tokenizer (overflowing windows with offsets).")

  def __call__(self, inputs, **kwargs):
    p = self.call_params(kwargs)
    texts, single = as_list(inputs)
    tok_kwargs = dict(truncation=bool(self.tokenizer.model_max_length), return_special_tokens_mask=True,
                      return_offsets_mapping=self.tokenizer.is_fast)
    if p["stride"] is not None:
      tok_kwargs.update(return_overflowing_tokens=True, padding=True, stride=p["stride"])
    windows = []  # (text index, encoding, window index)
    for t, text in enumerate(texts):
      enc = self.tokenizer(text, **tok_kwargs)
      if p["stride"] is None:
        enc = {k: [v] for k, v in enc.items()}  # one window, batched like the stride case
      windows += [(t, enc, i) for i in range(len(enc["input_ids"]))]
    logits = self.forward([self.model_inputs(enc, i) for _, enc, i in windows])
    results = [[] for _ in texts]
    n_windows = [0] * len(texts)
    for (t, enc, i), window_logits in zip(windows, logits):
      n_windows[t] += 1
      results[t] += self.postprocess(texts[t], enc, i, window_logits, p)
    results = [merge_overlapping(r) if n > 1 else r for r, n in zip(results, n_windows)]
    return results[0] if single else results

  def postprocess(self, sentence, enc, i, logits, p):
    """The kept entities of window `i` of an encoding."""
    ignore = ["O"] if p["ignore_labels"] is None else p["ignore_labels"]
    scores = softmax(np.asarray(logits, np.float32))
    offsets = enc["offset_mapping"][i] if "offset_mapping" in enc else None
    pre = self.gather_pre_entities(sentence, enc["input_ids"][i], scores, offsets,
                                   enc["special_tokens_mask"][i], p["aggregation_strategy"])
    entities = self.aggregate(pre, p["aggregation_strategy"])
    return [e for e in entities
            if e.get("entity") not in ignore and e.get("entity_group") not in ignore]

  def gather_pre_entities(self, sentence, input_ids, scores, offsets, special_tokens_mask, strategy):
    """Per non-special token: word piece, scores, character span and whether it continues a word."""
    pre = []
    model = getattr(getattr(self.tokenizer, "_tokenizer", None), "model", None)
    word_aware = bool(getattr(model, "continuing_subword_prefix", None))
    for idx, token_scores in enumerate(scores):
      if special_tokens_mask[idx]:
        continue
      word = self.tokenizer.convert_ids_to_tokens(int(input_ids[idx]))
      start = end = None
      is_subword = False
      if offsets is not None:
        start, end = int(offsets[idx][0]), int(offsets[idx][1])
        word_ref = sentence[start:end]
        if word_aware:  # "##"-style pieces: a piece shorter in the text than in the vocab continues
          is_subword = len(word) != len(word_ref)
        else:
          if strategy in ("first", "average", "max"):
            warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning)
          is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
        if int(input_ids[idx]) == self.tokenizer.unk_token_id:
          word, is_subword = word_ref, False
      pre.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                  "is_subword": is_subword})
    return pre

  def aggregate(self, pre, strategy):
    id2label = self.model.config.id2label
    if strategy in ("none", "simple"):
      entities = []
      for e in pre:
        best = int(e["scores"].argmax())
        entities.append({"entity": id2label[best], "score": float(e["scores"][best]),
                         "index": e["index"], "word": e["word"], "start": e["start"], "end": e["end"]})
    else:
      entities = self.aggregate_words(pre, strategy)
    return entities if strategy == "none" else self.group_entities(entities)

  def aggregate_word(self, pieces, strategy):
    """One word's entity from its pieces: the first piece's, the surest piece's, or the mean scores."""
    if strategy == "first":
      scores = pieces[0]["scores"]
    elif strategy == "max":
      scores = max(pieces, key=lambda e: e["scores"].max())["scores"]
    else:
      scores = np.nanmean(np.stack([e["scores"] for e in pieces]), axis=0)
    best = int(scores.argmax())
    return {"entity": self.model.config.id2label[best], "score": float(scores[best]),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in pieces]),
            "start": pieces[0]["start"], "end": pieces[-1]["end"]}

  def aggregate_words(self, pre, strategy):
    words, group = [], None
    for e in pre:
      if group is None:
        group = [e]
      elif e["is_subword"]:
        group.append(e)
      else:
        words.append(self.aggregate_word(group, strategy))
        group = [e]
    if group is not None:
      words.append(self.aggregate_word(group, strategy))
    return words

  def group_sub_entities(self, entities):
    return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": float(np.nanmean([e["score"] for e in entities])),
            "word": self.tokenizer.convert_tokens_to_string([e["word"] for e in entities]),
            "start": entities[0]["start"], "end": entities[-1]["end"]}

  def group_entities(self, entities):
    """Adjacent entities of one tag join a group unless the next one starts anew (B-)."""
    groups, current = [], []
    for e in entities:
      if current:
        bi, tag = get_tag(e["entity"])
        _, last_tag = get_tag(current[-1]["entity"])
        if not (tag == last_tag and bi != "B"):
          groups.append(self.group_sub_entities(current))
          current = []
      current.append(e)
    if current:
      groups.append(self.group_sub_entities(current))
    return groups
