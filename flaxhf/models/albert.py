"""ALBERT: BERT embeddings in `embedding_size`, projected up into layers shared across depth.

`num_hidden_layers` steps run through `num_hidden_groups` groups of `inner_group_num` layers each, so
one set of weights serves several steps. Module and parameter names equal transformers' PyTorch names.
"""

import flax.linen as nn
import jax.numpy as jnp
from transformers import AlbertConfig

from flaxhf.models import outputs as O
from flaxhf.models.base import model_family
from flaxhf.models.bert import BertEmbeddings
from flaxhf.models.layers import (LayerNorm, Linear, OutputBias, attention_bias, constrain,
                                  dot_product_attention, get_activation, merge_heads, split_heads)


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
    a = nn.Dropout(c.hidden_dropout_prob)(a, deterministic=deterministic)
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
        hidden, attentions = hidden + (x,), attentions + (probs,)
    pooled = None
    if self.add_pooling_layer:
      pooled = jnp.tanh(Linear(c.hidden_size, (None, "embed"), std, dtype=d, name="pooler")(x[:, 0]))
    return O.BaseModelOutputWithPooling(
        last_hidden_state=x, pooler_output=pooled,
        hidden_states=hidden if output_hidden_states else None,
        attentions=attentions if output_attentions else None)


class _Head(nn.Module):
  """Base for heads: runs the encoder under `albert`, with the pooler when the head reads it."""

  config: AlbertConfig
  dtype: jnp.dtype = jnp.float32
  pooler = False

  def encode(self, input_ids, attention_mask, token_type_ids, position_ids, deterministic,
             output_attentions, output_hidden_states):
    return AlbertModule(self.config, self.dtype, add_pooling_layer=self.pooler, name="albert")(
        input_ids, attention_mask, token_type_ids, position_ids, deterministic, output_attentions,
        output_hidden_states)


class AlbertForSequenceClassificationModule(_Head):
  pooler = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                      output_attentions, output_hidden_states)
    x = nn.Dropout(c.classifier_dropout_prob)(out.pooler_output, deterministic=deterministic)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="classifier")(x)
    return O.SequenceClassifierOutput(logits=logits.astype(jnp.float32),
                                      hidden_states=out.hidden_states, attentions=out.attentions)


class AlbertForTokenClassificationModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    out = self.encode(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                      output_attentions, output_hidden_states)
    rate = c.hidden_dropout_prob if c.classifier_dropout_prob is None else c.classifier_dropout_prob
    x = nn.Dropout(rate)(out.last_hidden_state, deterministic=deterministic)
    logits = Linear(c.num_labels, ("classes", "embed"), c.initializer_range, dtype=self.dtype,
                    name="classifier")(x)
    return O.TokenClassifierOutput(logits=logits.astype(jnp.float32),
                                   hidden_states=out.hidden_states, attentions=out.attentions)


class AlbertForQuestionAnsweringModule(_Head):

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


class AlbertForMultipleChoiceModule(_Head):
  pooler = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c = self.config
    num_choices = input_ids.shape[1]
    flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
    out = self.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                      deterministic, output_attentions, output_hidden_states)
    x = nn.Dropout(c.classifier_dropout_prob)(out.pooler_output, deterministic=deterministic)
    logits = Linear(1, ("classes", "embed"), c.initializer_range, dtype=self.dtype, name="classifier")(x)
    return O.MultipleChoiceModelOutput(logits=logits.reshape(-1, num_choices).astype(jnp.float32),
                                       hidden_states=out.hidden_states, attentions=out.attentions)


class AlbertForMaskedLMModule(_Head):

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, position_ids=None, deterministic=True,
               output_attentions=False, output_hidden_states=False):
    c, d, std = self.config, self.dtype, self.config.initializer_range
    encoder = AlbertModule(c, d, add_pooling_layer=False, name="albert")
    out = encoder(input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                  output_attentions, output_hidden_states)
    # AlbertMLMHead: dense (hidden -> embedding_size), activation, LayerNorm, decoder.
    x = Linear(c.embedding_size, (None, "embed"), std, dtype=d, name="predictions.dense")(
        out.last_hidden_state)
    x = LayerNorm(c.layer_norm_eps, dtype=d, name="predictions.LayerNorm")(
        get_activation(c.hidden_act)(x))
    bias_V = OutputBias(c.vocab_size, name="predictions")().astype(d)
    if c.tie_word_embeddings:  # decoder.weight is the word embeddings, decoder.bias predictions.bias
      table_VxD = nn.meta.unbox(encoder.variables["params"]["embeddings"]["word_embeddings"]["weight"])
      logits = jnp.einsum("...d,vd->...v", x, table_VxD.astype(d)) + bias_V
    else:  # untied, the decoder has its own bias and predictions.bias is left unused, as in transformers
      logits = Linear(c.vocab_size, ("vocab", "embed"), std, dtype=d, name="predictions.decoder")(x)
    return O.MaskedLMOutput(logits=logits.astype(jnp.float32), hidden_states=out.hidden_states,
                            attentions=out.attentions)


_HEADS = {
    "Model": (AlbertModule, None),
    "ForSequenceClassification": (AlbertForSequenceClassificationModule, "sequence_classification"),
    "ForTokenClassification": (AlbertForTokenClassificationModule, "token_classification"),
    "ForQuestionAnswering": (AlbertForQuestionAnsweringModule, "question_answering"),
    "ForMultipleChoice": (AlbertForMultipleChoiceModule, "multiple_choice"),
    "ForMaskedLM": (AlbertForMaskedLMModule, "masked_lm"),
}

# Older checkpoints carry the tied decoder copies; a tied model reads embeddings and predictions.bias.
FlaxAlbertPreTrainedModel, _albert = model_family(
    "Albert", AlbertConfig, "albert", _HEADS,
    ignore_on_load=(r"^predictions\.decoder\.(weight|bias)$",))
FlaxAlbertModel = _albert["Model"]
FlaxAlbertForSequenceClassification = _albert["ForSequenceClassification"]
FlaxAlbertForTokenClassification = _albert["ForTokenClassification"]
FlaxAlbertForQuestionAnswering = _albert["ForQuestionAnswering"]
FlaxAlbertForMultipleChoice = _albert["ForMultipleChoice"]
FlaxAlbertForMaskedLM = _albert["ForMaskedLM"]
