"""DistilBERT: a post-norm BERT encoder without token types or pooler, optionally sinusoidal positions.

Module and parameter names equal transformers' PyTorch names (`distilbert.transformer.layer.0.ffn.lin1`).
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from transformers import DistilBertConfig

from flaxhf.models import heads
from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.layers import (Dropout, Embedding, LayerNorm, LayerStack, Linear, attention_bias,
                                  constrain, dot_product_attention, get_activation, layer_stack,
                                  merge_heads, split_heads)

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
    return Dropout(c.dropout)(x, deterministic=deterministic)


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
    m = Dropout(c.dropout)(m, deterministic=deterministic)
    out = LayerNorm(_EPS, dtype=d, name="output_layer_norm")(m + x)
    return constrain(out, ("batch", "seq", "embed")), (probs if output_attentions else None)


class DistilBertModule(nn.Module):
  """The base encoder (`DistilBertModel`); takes token_type_ids only to share the others' signature."""

  config: DistilBertConfig
  dtype: jnp.dtype = jnp.float32
  stack: LayerStack = LayerStack()

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    del token_type_ids  # DistilBERT has no segment embeddings
    c, d = self.config, self.dtype
    x = DistilBertEmbeddings(c, d, name="embeddings")(input_ids, position_ids, deterministic)
    bias = attention_bias(attention_mask, d)
    embedded = x
    x, hidden, attentions = layer_stack(
        lambda name: DistilBertLayer(c, d, name=name), c.n_layers, "transformer.layer", self.stack,
        x, bias, deterministic, output_attentions, collect=output_hidden_states)
    return O.BaseModelOutput(last_hidden_state=x,
                             hidden_states=(embedded,) + hidden if output_hidden_states else None,
                             attentions=attentions if output_attentions else None)


class DistilBertHead(heads.Head):
  """The family's hooks: the encoder under `distilbert`, its dropouts, pre_classifier and MLM names."""

  stack: LayerStack = LayerStack()

  def encoder(self):
    return DistilBertModule(self.config, self.dtype, stack=self.stack, name="distilbert")

  def classifier_dropout(self):
    return self.config.dropout

  def qa_dropout(self):
    c = self.config
    if c.num_labels != 2:  # as transformers: the head splits its outputs into start and end
      raise ValueError(f"config.num_labels should be 2, but it is {c.num_labels}")
    return c.qa_dropout

  def sequence_features(self, out, deterministic):
    """pre_classifier -> ReLU -> dropout on the first token (sequence and choice heads)."""
    c = self.config
    x = self.linear(c.dim, "pre_classifier", (None, "embed"))(out.last_hidden_state[:, 0])
    return Dropout(c.seq_classif_dropout)(nn.relu(x), deterministic=deterministic)

  def lm_head(self):  # tied, vocab_projector.weight is the word embedding matrix; its bias is own
    c = self.config
    return heads.LMHead("vocab_transform", "vocab_layer_norm", bias="vocab_projector",
                        decoder="vocab_projector", decoder_bias=True, features=c.dim,
                        activation=c.activation, eps=_EPS)


# Older checkpoints carry the tied copy of the word embeddings; a tied model reads the embeddings.
(FlaxDistilBertPreTrainedModel, FlaxDistilBertModel, FlaxDistilBertForSequenceClassification,
 FlaxDistilBertForTokenClassification, FlaxDistilBertForQuestionAnswering,
 FlaxDistilBertForMultipleChoice, FlaxDistilBertForMaskedLM) = model_family(
    "DistilBert", DistilBertConfig, "distilbert",
    heads.family_modules(DistilBertModule, DistilBertHead), uses_token_type_ids=False,
    ignore_on_load=(r"^vocab_projector\.weight$",))
