"""Model outputs: pytrees with the transformers field names that also index like tuples."""

import dataclasses
from typing import Any, Optional

import flax.struct

Array = Any


class ModelOutput:
  """Base for outputs: `out.logits`, `out["logits"]` and `out[0]` (skipping fields that are None)."""

  def to_tuple(self):
    return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

  def keys(self):
    return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

  def __getitem__(self, key):
    if isinstance(key, str):
      if key not in self.keys():
        raise KeyError(f"{type(self).__name__} has no field {key!r}; it has {self.keys()}.")
      return getattr(self, key)
    return self.to_tuple()[key]

  def __iter__(self):
    return iter(self.to_tuple())

  def __len__(self):
    return len(self.to_tuple())


@flax.struct.dataclass
class BaseModelOutput(ModelOutput):
  last_hidden_state: Array = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@flax.struct.dataclass
class BaseModelOutputWithPooling(ModelOutput):
  last_hidden_state: Array = None
  pooler_output: Optional[Array] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@flax.struct.dataclass
class BaseModelOutputWithPast(ModelOutput):
  """A decoder's output; `past_key_values` is the updated cache when one was passed in."""

  last_hidden_state: Array = None
  past_key_values: Optional[Any] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@flax.struct.dataclass
class CausalLMOutput(ModelOutput):
  """A causal LM's output; `past_key_values` is the updated cache when one was passed in."""

  loss: Optional[Array] = None
  logits: Array = None
  past_key_values: Optional[Any] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@flax.struct.dataclass
class SequenceClassifierOutput(ModelOutput):
  loss: Optional[Array] = None
  logits: Array = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


@flax.struct.dataclass
class TokenClassifierOutput(SequenceClassifierOutput):
  pass


@flax.struct.dataclass
class MultipleChoiceModelOutput(SequenceClassifierOutput):
  pass


@flax.struct.dataclass
class MaskedLMOutput(SequenceClassifierOutput):
  pass


@flax.struct.dataclass
class QuestionAnsweringModelOutput(ModelOutput):
  loss: Optional[Array] = None
  start_logits: Array = None
  end_logits: Array = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


# ---- encoder-decoder outputs (transformers v4 Flax field names) ------------------------------------
@flax.struct.dataclass
class BaseModelOutputWithPastAndCrossAttentions(ModelOutput):
  """A seq2seq decoder's output (`model.decode` of a base model); `past_key_values` as passed in, updated."""

  last_hidden_state: Array = None
  past_key_values: Optional[Any] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None
  cross_attentions: Optional[tuple] = None


@flax.struct.dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
  """A seq2seq LM's `decode` output: next-token logits, the updated cache."""

  loss: Optional[Array] = None
  logits: Array = None
  past_key_values: Optional[Any] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None
  cross_attentions: Optional[tuple] = None


@flax.struct.dataclass
class Seq2SeqModelOutput(ModelOutput):
  last_hidden_state: Array = None
  past_key_values: Optional[Any] = None
  decoder_hidden_states: Optional[tuple] = None
  decoder_attentions: Optional[tuple] = None
  cross_attentions: Optional[tuple] = None
  encoder_last_hidden_state: Optional[Array] = None
  encoder_hidden_states: Optional[tuple] = None
  encoder_attentions: Optional[tuple] = None


@flax.struct.dataclass
class Seq2SeqLMOutput(ModelOutput):
  loss: Optional[Array] = None
  logits: Array = None
  past_key_values: Optional[Any] = None
  decoder_hidden_states: Optional[tuple] = None
  decoder_attentions: Optional[tuple] = None
  cross_attentions: Optional[tuple] = None
  encoder_last_hidden_state: Optional[Array] = None
  encoder_hidden_states: Optional[tuple] = None
  encoder_attentions: Optional[tuple] = None


@flax.struct.dataclass
class Seq2SeqSequenceClassifierOutput(Seq2SeqLMOutput):
  pass


@flax.struct.dataclass
class Seq2SeqQuestionAnsweringModelOutput(ModelOutput):
  loss: Optional[Array] = None
  start_logits: Array = None
  end_logits: Array = None
  past_key_values: Optional[Any] = None
  decoder_hidden_states: Optional[tuple] = None
  decoder_attentions: Optional[tuple] = None
  cross_attentions: Optional[tuple] = None
  encoder_last_hidden_state: Optional[Array] = None
  encoder_hidden_states: Optional[tuple] = None
  encoder_attentions: Optional[tuple] = None
