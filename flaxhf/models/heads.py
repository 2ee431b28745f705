"""Task heads shared by every encoder family: sequence/token classification, QA, multiple choice, MLM.

A family writes its encoder and one `Head` subclass with hooks for what differs (the encoder and its
prefix, dropout rates, which features the classifiers read, the masked-LM names); `family_modules`
mixes that into each generic head below. transformers names these head layers alike in every family
(`classifier`, `qa_outputs`, ...), so parameter paths stay the PyTorch state-dict keys.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
from transformers import PretrainedConfig

from flaxhf.models import outputs as O
from flaxhf.models.layers import Dropout, LayerNorm, Linear, OutputBias, get_activation


@dataclasses.dataclass(frozen=True)
class LMHead:
  """transformers' names and sizes of a masked-LM head: dense -> activation -> LayerNorm -> decoder."""

  dense: str          # the transform's Linear
  norm: str           # its LayerNorm
  bias: str           # module holding the vocabulary bias (`<bias>.bias`) added to the tied decoder
  decoder: str        # the untied decoder's Linear
  decoder_bias: bool  # the untied decoder has its own bias, so `<bias>.bias` is not added
  features: int       # transform width (the embedding size)
  activation: str
  eps: float


class Head(nn.Module):
  """Base for task heads: encodes, then `predict`s; a family subclasses it once with its hooks."""

  config: PretrainedConfig
  dtype: jnp.dtype = jnp.float32
  pooler = False  # whether the head reads pooler_output, so the encoder builds its pooler
  task = None     # the auto-class task this head serves
  token_classifier = "classifier"  # the token classifier's name (transformers' Llama family: `score`)

  def encoder(self) -> nn.Module:
    """The family's base module, named as transformers' base-model attribute (`bert`, `albert`, ...)."""
    raise NotImplementedError

  def classifier_dropout(self) -> float:
    """Dropout before the token classifier, and on pooler_output before the sequence classifier."""
    raise NotImplementedError

  def qa_dropout(self) -> float:
    return 0.0  # most families feed qa_outputs the hidden states as they are

  def qa_num_outputs(self) -> int:
    return self.config.num_labels  # start and end; GPT-2 fixes it at 2 whatever num_labels says

  def sequence_features(self, out, deterministic):
    """What the sequence and choice classifiers read: pooler_output after dropout."""
    return Dropout(self.classifier_dropout())(out.pooler_output, deterministic=deterministic)

  def classify(self, out, num_outputs, deterministic):
    """Logits of the sequence and choice heads: `classifier` over the sequence features."""
    return self.linear(num_outputs, "classifier")(self.sequence_features(out, deterministic))

  def lm_head(self) -> LMHead:
    raise NotImplementedError

  def linear(self, features, name, axes=("classes", "embed"), **kwargs):
    return Linear(features, axes, self.config.initializer_range, dtype=self.dtype, name=name, **kwargs)

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False,
               **encoder_kwargs):
    shape = input_ids.shape
    inputs = (input_ids, attention_mask, token_type_ids, position_ids)
    if len(shape) == 3:  # multiple choice encodes [batch, choices, length] as [batch * choices, length]
      inputs = [None if a is None else a.reshape(-1, shape[-1]) for a in inputs]
    encoder = self.encoder()
    # encoder_kwargs: what only one family's encoder takes (GPT-2's init_cache).
    out = encoder(*inputs, deterministic, output_attentions, output_hidden_states, **encoder_kwargs)
    fields = self.predict(encoder, out, deterministic, shape)
    return self.output_class(**{k: v.astype(jnp.float32) for k, v in fields.items()},
                             hidden_states=out.hidden_states, attentions=out.attentions)


# Each generic head is named as the public-class suffix it serves, less "For" (ForMaskedLM: MaskedLM).
class SequenceClassification(Head):
  task = "sequence_classification"
  pooler = True
  output_class = O.SequenceClassifierOutput

  def predict(self, encoder, out, deterministic, shape):
    return {"logits": self.classify(out, self.config.num_labels, deterministic)}


class TokenClassification(Head):
  task = "token_classification"
  output_class = O.TokenClassifierOutput

  def predict(self, encoder, out, deterministic, shape):
    x = Dropout(self.classifier_dropout())(out.last_hidden_state, deterministic=deterministic)
    return {"logits": self.linear(self.config.num_labels, self.token_classifier)(x)}


class QuestionAnswering(Head):
  task = "question_answering"
  output_class = O.QuestionAnsweringModelOutput

  def predict(self, encoder, out, deterministic, shape):
    x = Dropout(self.qa_dropout())(out.last_hidden_state, deterministic=deterministic)
    logits = self.linear(self.qa_num_outputs(), "qa_outputs")(x)
    return {"start_logits": logits[..., 0], "end_logits": logits[..., 1]}


class MultipleChoice(Head):
  task = "multiple_choice"
  pooler = True
  output_class = O.MultipleChoiceModelOutput

  def predict(self, encoder, out, deterministic, shape):
    return {"logits": self.classify(out, 1, deterministic).reshape(shape[:-1])}  # [batch, choices]


class MaskedLM(Head):
  task = "masked_lm"
  output_class = O.MaskedLMOutput

  def predict(self, encoder, out, deterministic, shape):
    c, d, lm = self.config, self.dtype, self.lm_head()
    x = self.linear(lm.features, lm.dense, (None, "embed"))(out.last_hidden_state)
    x = LayerNorm(lm.eps, dtype=d, name=lm.norm)(get_activation(lm.activation)(x))
    if c.tie_word_embeddings:  # the decoder weight is the word-embedding matrix
      table_VxD = nn.meta.unbox(encoder.variables["params"]["embeddings"]["word_embeddings"]["weight"])
      logits = jnp.einsum("...d,vd->...v", x, table_VxD.astype(d))
      return {"logits": logits + OutputBias(c.vocab_size, name=lm.bias)().astype(d)}
    logits = self.linear(c.vocab_size, lm.decoder, ("vocab", "embed"), use_bias=lm.decoder_bias)(x)
    if lm.bias != lm.decoder:  # transformers keeps `<bias>.bias` even beside a decoder bias (ALBERT)
      bias_V = OutputBias(c.vocab_size, name=lm.bias)().astype(d)
      logits = logits if lm.decoder_bias else logits + bias_V
    return {"logits": logits}


TASK_HEADS = (SequenceClassification, TokenClassification, QuestionAnswering, MultipleChoice, MaskedLM)


def family_modules(encoder, family_head, *specific) -> dict:
  """The Linen module per public-class suffix: `encoder`, then each task head over `family_head`."""
  # A family's own subclass in `specific` replaces the generated head for its task.
  arch = encoder.__name__[:-len("Module")]
  own = {m.task: m for m in specific}
  modules = {"Model": encoder}
  for generic in TASK_HEADS:
    suffix = "For" + generic.__name__
    modules[suffix] = own.get(generic.task) or type(
        f"{arch}{suffix}Module", (family_head, generic), {"__module__": family_head.__module__})
  return modules
