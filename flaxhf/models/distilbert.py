"""DistilBERT: a post-norm BERT encoder without token types or pooler, optionally sinusoidal positions.

Module and parameter names equal transformers' PyTorch names (`distilbert.transformer.layer.0.ffn.lin1`).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from transformers import DistilBertConfig

from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.layers import (Embedding, LayerNorm, Linear, OutputBias, attention_bias, constrain,
                                  dot_product_attention, get_activation, merge_heads, split_heads)

_EPS = 1e-12  # DistilBERT hard-codes its LayerNorm epsilon; the config has no field for it


def sinusoidal_init(key, shape, dtype=jnp.float32):
  """transformers' create_sinusoidal_embeddings: sin(pos / 10000^(2(j//2)/dim)) on even j, cos on odd."""
  del key  # deterministic table
  n_pos, dim = shape
  j = np.arange(dim)
  angle_PxD = np.arange(n_pos)[:, None] / np.power(10000, 2 * (j // 2) / dim)
  return jnp.asarray(np.where(j % 2 == 0, np.sin(angle_PxD), np.cos(angle_PxD)), dtype)


class DistilBertEmbeddings(nn.Module):
  config: DistilBertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, position_ids, deterministic):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    x = Embedding(c.vocab_size, c.dim, std=std, padding_idx=c.pad_token_id, dtype=d,
                  name="word_embeddings")(input_ids)
    # The sinusoidal table is only the initial value: transformers 5 keeps it a trainable parameter.
    x = x + Embedding(c.max_position_embeddings, c.dim, axes=(None, "embed"), std=std,
                      embedding_init=sinusoidal_init if c.sinusoidal_pos_embds else None, dtype=d,
                      name="position_embeddings")(position_ids)
    x = LayerNorm(_EPS, dtype=d, name="LayerNorm")(x)
    return nn.Dropout(c.dropout)(x, deterministic=deterministic)


class DistilBertLayer(nn.Module):
  """`TransformerBlock`: attention (no dropout on its output) + LayerNorm, FFN + dropout + LayerNorm."""

  config: DistilBertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE, bias, deterministic, output_attentions):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    q, k, v = (split_heads(Linear(c.dim, ("heads", "embed"), std, dtype=d, name=f"attention.{n}")(
        x_BxLxE), c.n_heads) for n in ("q_lin", "k_lin", "v_lin"))
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attention_dropout,
                                       deterministic=deterministic, module=self, dtype=d)
    a = Linear(c.dim, ("embed", "heads"), std, dtype=d, name="attention.out_lin")(merge_heads(ctx))
    x = LayerNorm(_EPS, dtype=d, name="sa_layer_norm")(a + x_BxLxE)
    m = Linear(c.hidden_dim, ("mlp", "embed"), std, dtype=d, name="ffn.lin1")(x)
    m = get_activation(c.activation)(m)
    m = Linear(c.dim, ("embed", "mlp"), std, dtype=d, name="ffn.lin2")(m)
    m = nn.Dropout(c.dropout)(m, deterministic=deterministic)
    out = LayerNorm(_EPS, dtype=d, name="output_layer_norm")(m + x)
    return constrain(out, ("batch", "seq", "embed")), (probs if output_attentions else None)


class DistilBertModule(nn.Module):
  """The base encoder (`DistilBertModel`); takes token_type_ids only to share the others' signature."""

  config: DistilBertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    del token_type_ids  # DistilBERT has no segment embeddings
    c, d = self.config, self.dtype
    x = DistilBertEmbeddings(c, d, name="embeddings")(input_ids, position_ids, deterministic)
    bias = attention_bias(attention_mask, d)
    hidden, attentions = (x,), ()
    for i in range(c.n_layers):
      x, probs = DistilBertLayer(c, d, name=f"transformer.layer.{i}")(x, bias, deterministic,
                                                                      output_attentions)
      hidden, attentions = hidden + (x,), attentions + (probs,)
    return O.BaseModelOutput(last_hidden_state=x,
                             hidden_states=hidden if output_hidden_states else None,
                             attentions=attentions if output_attentions else None)


class _Head(nn.Module):
  """Base for heads: runs the encoder under `distilbert`."""

  config: DistilBertConfig
  dtype: jnp.dtype = jnp.float32

  def encode(self, input_ids, attention_mask, position_ids, deterministic, output_attentions,
             output_hidden_states):
    return DistilBertModule(self.config, self.dtype, name="distilbert")(
        input_ids, attention_mask, None, position_ids, deterministic, output_attentions,
        output_hidden_states)


def _classify_first_token(out, num_outputs, config, dtype, deterministic):
  """pre_classifier -> ReLU -> dropout -> classifier on the first token (sequence and choice heads)."""
  std = config.initializer_range
  x = Linear(config.dim, (None, "embed"), std, dtype=dtype, name="pre_classifier")(
      out.last_hidden_state[:, 0])
  x = nn.Dropout(config.seq_classif_dropout)(nn.relu(x), deterministic=deterministic)
  return Linear(num_outputs, ("classes", "embed"), std, dtype=dtype, name="classifier")(x)


class DistilBertForSequenceClassificationModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    out = self.encode(input_ids, attention_mask, position_ids, deterministic, output_attentions,
                      output_hidden_states)
    logits = _classify_first_token(out, self.config.num_labels, self.config, self.dtype, deterministic)
    return O.SequenceClassifierOutput(logits=logits.astype(jnp.float32),
                                      hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBertForTokenClassificationModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c = self.config
    out = self.encode(input_ids, attention_mask, position_ids, deterministic, output_attentions,
                      output_hidden_states)
    x = nn.Dropout(c.dropout)(out.last_hidden_state, deterministic=deterministic)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="classifier")(x)
    return O.TokenClassifierOutput(logits=logits.astype(jnp.float32),
                                   hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBertForQuestionAnsweringModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c = self.config
    if c.num_labels != 2:  # as transformers: the head splits its outputs into start and end
      raise ValueError(f"config.num_labels should be 2, but it is {c.num_labels}")
    out = self.encode(input_ids, attention_mask, position_ids, deterministic, output_attentions,
                      output_hidden_states)
    x = nn.Dropout(c.qa_dropout)(out.last_hidden_state, deterministic=deterministic)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="qa_outputs")(x).astype(jnp.float32)
    return O.QuestionAnsweringModelOutput(
        start_logits=logits[..., 0], end_logits=logits[..., 1],
        hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBertForMultipleChoiceModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    num_choices = input_ids.shape[1]
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
    out = self.encode(flat(input_ids), flat(attention_mask), flat(position_ids), deterministic,
                      output_attentions, output_hidden_states)
    logits = _classify_first_token(out, 1, self.config, self.dtype, deterministic)
    return O.MultipleChoiceModelOutput(logits=logits.reshape(-1, num_choices).astype(jnp.float32),
                                       hidden_states=out.hidden_states, attentions=out.attentions)


class DistilBertForMaskedLMModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    encoder = DistilBertModule(c, d, name="distilbert")
    out = encoder(input_ids, attention_mask, None, position_ids, deterministic, output_attentions,
                  output_hidden_states)
    x = Linear(c.dim, (None, "embed"), std, dtype=d, name="vocab_transform")(out.last_hidden_state)
    x = LayerNorm(_EPS, dtype=d, name="vocab_layer_norm")(get_activation(c.activation)(x))
    if c.tie_word_embeddings:  # vocab_projector.weight is the word embedding matrix; its bias is own
      table_VxD = nn.meta.unbox(encoder.variables["params"]["embeddings"]["word_embeddings"]["weight"])
      logits = jnp.einsum("...d,vd->...v", x, table_VxD.astype(d))
      logits = logits + OutputBias(c.vocab_size, name="vocab_projector")().astype(d)
    else:
      logits = Linear(c.vocab_size, ("vocab", "embed"), std, dtype=d, name="vocab_projector")(x)
    return O.MaskedLMOutput(logits=logits.astype(jnp.float32), hidden_states=out.hidden_states,
                            attentions=out.attentions)


_HEADS = {
    "Model": (DistilBertModule, None),
    "ForSequenceClassification": (DistilBertForSequenceClassificationModule, "sequence_classification"),
    "ForTokenClassification": (DistilBertForTokenClassificationModule, "token_classification"),
    "ForQuestionAnswering": (DistilBertForQuestionAnsweringModule, "question_answering"),
    "ForMultipleChoice": (DistilBertForMultipleChoiceModule, "multiple_choice"),
    "ForMaskedLM": (DistilBertForMaskedLMModule, "masked_lm"),
}

# Older checkpoints carry the tied copy of the word embeddings; a tied model reads the embeddings.
FlaxDistilBertPreTrainedModel, _distilbert = model_family(
    "DistilBert", DistilBertConfig, "distilbert", _HEADS, uses_token_type_ids=False,
    ignore_on_load=(r"^vocab_projector\.weight$",))
FlaxDistilBertModel = _distilbert["Model"]
FlaxDistilBertForSequenceClassification = _distilbert["ForSequenceClassification"]
FlaxDistilBertForTokenClassification = _distilbert["ForTokenClassification"]
FlaxDistilBertForQuestionAnswering = _distilbert["ForQuestionAnswering"]
FlaxDistilBertForMultipleChoice = _distilbert["ForMultipleChoice"]
FlaxDistilBertForMaskedLM = _distilbert["ForMaskedLM"]
