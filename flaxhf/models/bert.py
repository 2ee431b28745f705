"""BERT, RoBERTa and ELECTRA: one encoder, switched by `config.model_type`.

RoBERTa offsets positions past the padding index; ELECTRA embeds in `embedding_size` and projects up.
Module and parameter names equal transformers' PyTorch names.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
from transformers import BertConfig, ElectraConfig, RobertaConfig

from flaxhf.models import heads
from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.layers import (Dropout, Embedding, LayerNorm, LayerStack, Linear, attention_bias,
                                  constrain, dot_product_attention, get_activation, layer_stack,
                                  merge_heads, split_heads)


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
    return Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


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
    a = Dropout(c.hidden_dropout_prob)(a, deterministic=deterministic)
    x = LayerNorm(c.layer_norm_eps, dtype=d, name="attention.output.LayerNorm")(a + x_BxLxE)
    m = Linear(c.intermediate_size, ("mlp", "embed"), std, dtype=d, name="intermediate.dense")(x)
    m = get_activation(c.hidden_act)(m)
    m = Linear(c.hidden_size, ("embed", "mlp"), std, dtype=d, name="output.dense")(m)
    m = Dropout(c.hidden_dropout_prob)(m, deterministic=deterministic)
    out = LayerNorm(c.layer_norm_eps, dtype=d, name="output.LayerNorm")(m + x)
    return constrain(out, ("batch", "seq", "embed")), (probs if output_attentions else None)


class BertModule(nn.Module):
  """The base encoder (`BertModel`, `RobertaModel`, `ElectraModel`)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = True
  stack: LayerStack = LayerStack()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c, d = self.config, self.dtype
    x = BertEmbeddings(c, d, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
    if getattr(c, "embedding_size", c.hidden_size) != c.hidden_size:
      x = Linear(c.hidden_size, (None, "embed"), c.initializer_range, dtype=d,
                 name="embeddings_project")(x)
    bias = attention_bias(attention_mask, d)
    embedded = x
    x, hidden, attentions = layer_stack(
        lambda name: BertLayer(c, d, name=name), c.num_hidden_layers, "encoder.layer", self.stack,
        x, bias, deterministic, output_attentions, collect=output_hidden_states)
    pooled = None
    if self.add_pooling_layer and c.model_type != "electra":
      pooled = jnp.tanh(Linear(c.hidden_size, (None, "embed"), c.initializer_range, dtype=d,
                               name="pooler.dense")(x[:, 0]))
    return O.BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=pooled,
        hidden_states=(embedded,) + hidden if output_hidden_states else None,
        attentions=attentions if output_attentions else None)


class BertHead(heads.Head):
  """The family's hooks: the encoder under `config.model_type`, BERT's classifier dropout and MLM."""

  stack: LayerStack = LayerStack()

  def encoder(self):
    return BertModule(self.config, self.dtype, add_pooling_layer=self.pooler, stack=self.stack,
                      name=self.config.model_type)

  def classifier_dropout(self):
    c = self.config
    return c.classifier_dropout if getattr(c, "classifier_dropout", None) is not None \
        else c.hidden_dropout_prob

  def sequence_features(self, out, deterministic):
    c = self.config
    if c.model_type != "electra":
      return super().sequence_features(out, deterministic)
    # ElectraSequenceSummary on the first token; only the choice head reads it (see below).
    x = self.linear(c.hidden_size, "sequence_summary.summary", (None, "embed"))(
        out.last_hidden_state[:, 0])
    x = get_activation(c.summary_activation)(x) if c.summary_activation else x
    return Dropout(c.summary_last_dropout)(x, deterministic=deterministic)

  def lm_head(self):  # BertOnlyMLMHead, RobertaLMHead, ElectraGeneratorPredictions + generator_lm_head
    c = self.config
    dense, norm, bias, decoder = {
        "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                 "cls.predictions", "cls.predictions.decoder"),
        "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head", "lm_head.decoder"),
        "electra": ("generator_predictions.dense", "generator_predictions.LayerNorm",
                    "generator_lm_head", "generator_lm_head"),
    }[c.model_type]
    # Untied, ELECTRA's decoder is a plain Linear; BERT's and RoBERTa's keep the bias at `<head>.bias`.
    return heads.LMHead(dense, norm, bias, decoder, decoder_bias=c.model_type == "electra",
                        features=getattr(c, "embedding_size", c.hidden_size),
                        activation=c.hidden_act if c.model_type == "bert" else "gelu",
                        eps=c.layer_norm_eps)


class BertForSequenceClassificationModule(BertHead, heads.SequenceClassification):
  """BERT classifies pooler_output; RoBERTa and ELECTRA the first token, with their own two layers."""

  @property
  def pooler(self):
    return self.config.model_type == "bert"

  def classify(self, out, num_outputs, deterministic):
    c = self.config
    if c.model_type == "bert":
      return super().classify(out, num_outputs, deterministic)
    # RobertaClassificationHead / ElectraClassificationHead
    drop = Dropout(self.classifier_dropout())
    x = drop(out.last_hidden_state[:, 0], deterministic=deterministic)
    x = self.linear(c.hidden_size, "classifier.dense", (None, "embed"))(x)
    x = jnp.tanh(x) if c.model_type == "roberta" else get_activation("gelu")(x)
    x = drop(x, deterministic=deterministic)
    return self.linear(num_outputs, "classifier.out_proj")(x)


# Tied decoder copies that checkpoints may carry; the models read the embedding matrix instead.
_TIED = (r"^(cls\.predictions|lm_head)\.decoder\.(weight|bias)$", r"^generator_lm_head\.weight$")
_family = functools.partial(model_family, ignore_on_load=_TIED, modules=heads.family_modules(
    BertModule, BertHead, BertForSequenceClassificationModule))

(FlaxBertPreTrainedModel, FlaxBertModel, FlaxBertForSequenceClassification,
 FlaxBertForTokenClassification, FlaxBertForQuestionAnswering, FlaxBertForMultipleChoice,
 FlaxBertForMaskedLM) = _family("Bert", BertConfig, "bert")
(FlaxRobertaPreTrainedModel, FlaxRobertaModel, FlaxRobertaForSequenceClassification,
 FlaxRobertaForTokenClassification, FlaxRobertaForQuestionAnswering, FlaxRobertaForMultipleChoice,
 FlaxRobertaForMaskedLM) = _family("Roberta", RobertaConfig, "roberta")
(FlaxElectraPreTrainedModel, FlaxElectraModel, FlaxElectraForSequenceClassification,
 FlaxElectraForTokenClassification, FlaxElectraForQuestionAnswering, FlaxElectraForMultipleChoice,
 FlaxElectraForMaskedLM) = _family("Electra", ElectraConfig, "electra")
