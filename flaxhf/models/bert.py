"""BERT, RoBERTa and ELECTRA: one encoder, switched by `config.model_type`.

RoBERTa offsets positions past the padding index; ELECTRA embeds in `embedding_size` and projects up.
Module and parameter names equal transformers' PyTorch names.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
from transformers import BertConfig, ElectraConfig, RobertaConfig

from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.layers import (Embedding, LayerNorm, Linear, OutputBias, attention_bias, constrain,
                                  dot_product_attention, get_activation, merge_heads, split_heads)


def roberta_position_ids(input_ids, padding_idx):
  """Positions counted from padding_idx + 1 over non-pad tokens (transformers' RoBERTa rule)."""
  mask = (input_ids != padding_idx).astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask + padding_idx


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
    c = self.config
    dim = getattr(c, "embedding_size", c.hidden_size)  # ELECTRA embeds smaller than hidden
    pad = c.pad_token_id if c.model_type == "roberta" else None
    if position_ids is None:
      if c.model_type == "roberta":
        position_ids = roberta_position_ids(input_ids, c.pad_token_id)
      else:
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    std, d = c.initializer_range, self.dtype
    x = Embedding(c.vocab_size, dim, std=std, padding_idx=c.pad_token_id, dtype=d,
                  name="word_embeddings")(input_ids)
    x = x + Embedding(c.max_position_embeddings, dim, axes=(None, "embed"), std=std,
                      padding_idx=pad, dtype=d, name="position_embeddings")(position_ids)
    x = x + Embedding(c.type_vocab_size, dim, axes=(None, "embed"), std=std, dtype=d,
                      name="token_type_embeddings")(token_type_ids)
    x = LayerNorm(c.layer_norm_eps, dtype=d, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE, bias, deterministic, output_attentions):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    h = c.num_attention_heads
    q = split_heads(Linear(c.hidden_size, ("heads", "embed"), std, dtype=d,
                           name="attention.self.query")(x_BxLxE), h)
    k = split_heads(Linear(c.hidden_size, ("heads", "embed"), std, dtype=d,
                           name="attention.self.key")(x_BxLxE), h)
    v = split_heads(Linear(c.hidden_size, ("heads", "embed"), std, dtype=d,
                           name="attention.self.value")(x_BxLxE), h)
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attention_probs_dropout_prob,
                                       deterministic=deterministic, module=self, dtype=d)
    a = Linear(c.hidden_size, ("embed", "heads"), std, dtype=d,
               name="attention.output.dense")(merge_heads(ctx))
    a = nn.Dropout(c.hidden_dropout_prob)(a, deterministic=deterministic)
    x = LayerNorm(c.layer_norm_eps, dtype=d, name="attention.output.LayerNorm")(a + x_BxLxE)
    m = Linear(c.intermediate_size, ("mlp", "embed"), std, dtype=d, name="intermediate.dense")(x)
    m = get_activation(c.hidden_act)(m)
    m = Linear(c.hidden_size, ("embed", "mlp"), std, dtype=d, name="output.dense")(m)
    m = nn.Dropout(c.hidden_dropout_prob)(m, deterministic=deterministic)
    out = LayerNorm(c.layer_norm_eps, dtype=d, name="output.LayerNorm")(m + x)
    return constrain(out, ("batch", "seq", "embed")), (probs if output_attentions else None)


class BertModule(nn.Module):
  """The base encoder (`BertModel`, `RobertaModel`, `ElectraModel`)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c, d = self.config, self.dtype
    x = BertEmbeddings(c, d, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
    if getattr(c, "embedding_size", c.hidden_size) != c.hidden_size:
      x = Linear(c.hidden_size, (None, "embed"), c.initializer_range, dtype=d,
                 name="embeddings_project")(x)
    bias = attention_bias(attention_mask, d)
    hidden, attentions = (x,), ()
    for i in range(c.num_hidden_layers):
      x, probs = BertLayer(c, d, name=f"encoder.layer.{i}")(x, bias, deterministic, output_attentions)
      hidden, attentions = hidden + (x,), attentions + (probs,)
    pooled = None
    if self.add_pooling_layer and c.model_type != "electra":
      pooled = jnp.tanh(Linear(c.hidden_size, (None, "embed"), c.initializer_range, dtype=d,
                               name="pooler.dense")(x[:, 0]))
    return O.BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=pooled,
        hidden_states=hidden if output_hidden_states else None,
        attentions=attentions if output_attentions else None)


def _classifier_dropout(c):
  return c.classifier_dropout if getattr(c, "classifier_dropout", None) is not None \
      else c.hidden_dropout_prob


class _Head(nn.Module):
  """Base for heads: runs the encoder under the family's prefix and keeps its extra outputs."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  pooler = False  # whether the head reads pooler_output (BertModel's add_pooling_layer)

  def uses_pooler(self):
    return self.pooler

  def encode(self, input_ids, attention_mask, token_type_ids, position_ids, deterministic,
             output_attentions, output_hidden_states):
    return BertModule(self.config, self.dtype, add_pooling_layer=self.uses_pooler(),
                      name=self.config.model_type)(
        input_ids, attention_mask, token_type_ids, position_ids, deterministic, output_attentions,
        output_hidden_states)


class BertForSequenceClassificationModule(_Head):

  def uses_pooler(self):  # RoBERTa and ELECTRA classify the first token with their own head
    return self.config.model_type == "bert"

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                      output_attentions, output_hidden_states)
    drop = nn.Dropout(_classifier_dropout(c))
    if c.model_type == "bert":
      x = drop(out.pooler_output, deterministic=deterministic)
      logits = Linear(c.num_labels, ("classes", "embed"), std, dtype=d, name="classifier")(x)
    else:  # RobertaClassificationHead / ElectraClassificationHead on the first token
      x = drop(out.last_hidden_state[:, 0], deterministic=deterministic)
      x = Linear(c.hidden_size, (None, "embed"), std, dtype=d, name="classifier.dense")(x)
      x = jnp.tanh(x) if c.model_type == "roberta" else get_activation("gelu")(x)
      x = drop(x, deterministic=deterministic)
      logits = Linear(c.num_labels, ("classes", "embed"), std, dtype=d, name="classifier.out_proj")(x)
    return O.SequenceClassifierOutput(logits=logits.astype(jnp.float32),
                                      hidden_states=out.hidden_states, attentions=out.attentions)


class BertForTokenClassificationModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                      output_attentions, output_hidden_states)
    x = nn.Dropout(_classifier_dropout(c))(out.last_hidden_state, deterministic=deterministic)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="classifier")(x)
    return O.TokenClassifierOutput(logits=logits.astype(jnp.float32),
                                   hidden_states=out.hidden_states, attentions=out.attentions)


class BertForQuestionAnsweringModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                      output_attentions, output_hidden_states)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="qa_outputs")(out.last_hidden_state).astype(jnp.float32)
    return O.QuestionAnsweringModelOutput(
        start_logits=logits[..., 0], end_logits=logits[..., 1],
        hidden_states=out.hidden_states, attentions=out.attentions)


class BertForMultipleChoiceModule(_Head):
  pooler = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    num_choices = input_ids.shape[1]
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
    out = self.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                      deterministic, output_attentions, output_hidden_states)
    if c.model_type == "electra":  # ElectraSequenceSummary on the first token
      x = out.last_hidden_state[:, 0]
      x = Linear(c.hidden_size, (None, "embed"), std, dtype=d, name="sequence_summary.summary")(x)
      x = get_activation(c.summary_activation)(x) if c.summary_activation else x
      x = nn.Dropout(c.summary_last_dropout)(x, deterministic=deterministic)
    else:
      x = nn.Dropout(_classifier_dropout(c))(out.pooler_output, deterministic=deterministic)
    logits = Linear(1, ("classes", "embed"), std, dtype=d, name="classifier")(x)
    return O.MultipleChoiceModelOutput(logits=logits.reshape(-1, num_choices).astype(jnp.float32),
                                       hidden_states=out.hidden_states, attentions=out.attentions)


class BertForMaskedLMModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    encoder = BertModule(c, d, add_pooling_layer=False, name=c.model_type)
    out = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                  output_attentions, output_hidden_states)
    # transformers' names: BertOnlyMLMHead, RobertaLMHead, ElectraGeneratorPredictions + lm head.
    transform, dense, norm, decoder = {
        "bert": ("cls.predictions", "transform.dense", "transform.LayerNorm", "cls.predictions"),
        "roberta": ("lm_head", "dense", "layer_norm", "lm_head"),
        "electra": ("generator_predictions", "dense", "LayerNorm", "generator_lm_head"),
    }[c.model_type]
    act = get_activation(c.hidden_act if c.model_type == "bert" else "gelu")
    dim = getattr(c, "embedding_size", c.hidden_size)
    x = act(Linear(dim, (None, "embed"), std, dtype=d, name=f"{transform}.{dense}")(
        out.last_hidden_state))
    x = LayerNorm(c.layer_norm_eps, dtype=d, name=f"{transform}.{norm}")(x)
    if c.tie_word_embeddings:
      table_VxD = nn.meta.unbox(encoder.variables["params"]["embeddings"]["word_embeddings"]["weight"])
      logits = jnp.einsum("...d,vd->...v", x, table_VxD.astype(d))
      logits = logits + OutputBias(c.vocab_size, name=decoder)().astype(d)
    elif c.model_type == "electra":  # an untied generator_lm_head is a plain Linear
      logits = Linear(c.vocab_size, ("vocab", "embed"), std, dtype=d, name=decoder)(x)
    else:  # untied: `<head>.decoder.weight`, with the bias kept at `<head>.bias`
      logits = Linear(c.vocab_size, ("vocab", "embed"), std, use_bias=False, dtype=d,
                      name=f"{decoder}.decoder")(x)
      logits = logits + OutputBias(c.vocab_size, name=decoder)().astype(d)
    return O.MaskedLMOutput(logits=logits.astype(jnp.float32), hidden_states=out.hidden_states,
                            attentions=out.attentions)


# Tied decoder copies that checkpoints may carry; the models read the embedding matrix instead.
_TIED = (r"^(cls\.predictions|lm_head)\.decoder\.(weight|bias)$", r"^generator_lm_head\.weight$")

_HEADS = {
    "Model": (BertModule, None),
    "ForSequenceClassification": (BertForSequenceClassificationModule, "sequence_classification"),
    "ForTokenClassification": (BertForTokenClassificationModule, "token_classification"),
    "ForQuestionAnswering": (BertForQuestionAnsweringModule, "question_answering"),
    "ForMultipleChoice": (BertForMultipleChoiceModule, "multiple_choice"),
    "ForMaskedLM": (BertForMaskedLMModule, "masked_lm"),
}

_family = functools.partial(model_family, heads=_HEADS, ignore_on_load=_TIED)

FlaxBertPreTrainedModel, _bert = _family("Bert", BertConfig, "bert")
FlaxBertModel = _bert["Model"]
FlaxBertForSequenceClassification = _bert["ForSequenceClassification"]
FlaxBertForTokenClassification = _bert["ForTokenClassification"]
FlaxBertForQuestionAnswering = _bert["ForQuestionAnswering"]
FlaxBertForMultipleChoice = _bert["ForMultipleChoice"]
FlaxBertForMaskedLM = _bert["ForMaskedLM"]

FlaxRobertaPreTrainedModel, _roberta = _family("Roberta", RobertaConfig, "roberta")
FlaxRobertaModel = _roberta["Model"]
FlaxRobertaForSequenceClassification = _roberta["ForSequenceClassification"]
FlaxRobertaForTokenClassification = _roberta["ForTokenClassification"]
FlaxRobertaForQuestionAnswering = _roberta["ForQuestionAnswering"]
FlaxRobertaForMultipleChoice = _roberta["ForMultipleChoice"]
FlaxRobertaForMaskedLM = _roberta["ForMaskedLM"]

FlaxElectraPreTrainedModel, _electra = _family("Electra", ElectraConfig, "electra")
FlaxElectraModel = _electra["Model"]
FlaxElectraForSequenceClassification = _electra["ForSequenceClassification"]
FlaxElectraForTokenClassification = _electra["ForTokenClassification"]
FlaxElectraForQuestionAnswering = _electra["ForQuestionAnswering"]
FlaxElectraForMultipleChoice = _electra["ForMultipleChoice"]
FlaxElectraForMaskedLM = _electra["ForMaskedLM"]
