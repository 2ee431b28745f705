"""ALBERT: BERT embeddings in `embedding_size`, projected up into layers shared across depth.

`num_hidden_layers` steps run through `num_hidden_groups` groups of `inner_group_num` layers each, so
one set of weights serves several steps. Module and parameter names equal transformers' PyTorch names.
"""

import flax.linen as nn
import jax.numpy as jnp
from transformers import AlbertConfig

from flaxhf.models import heads
from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.bert import BertEmbeddings
from flaxhf.models.layers import (Dropout, LayerNorm, Linear, attention_bias, constrain,
                                  dot_product_attention, get_activation, materialize_gradient,
                                  merge_heads, split_heads)


class AlbertLayer(nn.Module):
  """Attention (dropout, residual, LayerNorm), then an FFN without dropout, as in transformers."""

  config: AlbertConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxE, bias, deterministic, output_attentions):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    q, k, v = (split_heads(Linear(c.hidden_size, ("heads", "embed"), std, dtype=d,
                                  name=f"attention.{n}")(x_BxLxE), c.num_attention_heads)
               for n in ("query", "key", "value"))
    q = constrain(q, ("batch", "seq", "heads", "kv"))
    ctx, probs = dot_product_attention(q, k, v, bias, dropout_rate=c.attention_probs_dropout_prob,
                                       deterministic=deterministic, module=self, dtype=d)
    a = Linear(c.hidden_size, ("embed", "heads"), std, dtype=d, name="attention.dense")(merge_heads(ctx))
    a = Dropout(c.hidden_dropout_prob)(a, deterministic=deterministic)
    x = LayerNorm(c.layer_norm_eps, dtype=d, name="attention.LayerNorm")(x_BxLxE + a)
    m = Linear(c.intermediate_size, ("mlp", "embed"), std, dtype=d, name="ffn")(x)
    m = get_activation(c.hidden_act)(m)
    m = Linear(c.hidden_size, ("embed", "mlp"), std, dtype=d, name="ffn_output")(m)
    out = LayerNorm(c.layer_norm_eps, dtype=d, name="full_layer_layer_norm")(m + x)
    return constrain(out, ("batch", "seq", "embed")), (probs if output_attentions else None)


class AlbertModule(nn.Module):
  """The base encoder (`AlbertModel`); hidden states and attentions come per layer call, as in v5."""

  config: AlbertConfig
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None,
               deterministic=True, output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    # AlbertEmbeddings is BertEmbeddings in `embedding_size` (same names, eps and dropout).
    x = BertEmbeddings(c, d, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
    x = Linear(c.hidden_size, (None, "embed"), std, dtype=d,
               name="encoder.embedding_hidden_mapping_in")(x)
    bias = attention_bias(attention_mask, d)
    # Each module is built once and called at every step that uses it, which shares its weights.
    groups = [[AlbertLayer(c, d, name=f"encoder.albert_layer_groups.{g}.albert_layers.{j}")
               for j in range(c.inner_group_num)] for g in range(c.num_hidden_groups)]
    hidden, attentions = (x,), ()
    for i in range(c.num_hidden_layers):
      for layer in groups[int(i / (c.num_hidden_layers / c.num_hidden_groups))]:  # transformers' index
        x, probs = layer(x, bias, deterministic, output_attentions)
        x = materialize_gradient(x)
        hidden, attentions = hidden + (x,), attentions + (probs,)
    pooled = None
    if self.add_pooling_layer:
      pooled = jnp.tanh(Linear(c.hidden_size, (None, "embed"), std, dtype=d, name="pooler")(x[:, 0]))
    return O.BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=pooled,
        hidden_states=hidden if output_hidden_states else None,
        attentions=attentions if output_attentions else None)


class AlbertHead(heads.Head):
  """The family's hooks: the encoder under `albert`, ALBERT's classifier dropout and AlbertMLMHead."""

  def encoder(self):
    return AlbertModule(self.config, self.dtype, add_pooling_layer=self.pooler, name="albert")

  def classifier_dropout(self):
    c = self.config
    return c.hidden_dropout_prob if c.classifier_dropout_prob is None else c.classifier_dropout_prob

  def lm_head(self):  # tied, decoder.weight is the word embeddings and decoder.bias predictions.bias
    c = self.config
    return heads.LMHead("predictions.dense", "predictions.LayerNorm", bias="predictions",
                        decoder="predictions.decoder", decoder_bias=True, features=c.embedding_size,
                        activation=c.hidden_act, eps=c.layer_norm_eps)


# Older checkpoints carry the tied decoder copies; a tied model reads embeddings and predictions.bias.
(FlaxAlbertPreTrainedModel, FlaxAlbertModel, FlaxAlbertForSequenceClassification,
 FlaxAlbertForTokenClassification, FlaxAlbertForQuestionAnswering, FlaxAlbertForMultipleChoice,
 FlaxAlbertForMaskedLM) = model_family(
    "Albert", AlbertConfig, "albert", heads.family_modules(AlbertModule, AlbertHead),
    ignore_on_load=(r"^predictions\.decoder\.(weight|bias)$",))
