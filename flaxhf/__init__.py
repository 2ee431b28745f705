"""flaxhf: Flax versions of the transformers models, a sharded trainer, and PyTorch export."""

from flaxhf.models.albert import (
    FlaxAlbertForMaskedLM, FlaxAlbertForMultipleChoice, FlaxAlbertForQuestionAnswering,
    FlaxAlbertForSequenceClassification, FlaxAlbertForTokenClassification, FlaxAlbertModel,
    FlaxAlbertPreTrainedModel)
from flaxhf.models.auto import (
    FLAX_MODEL_FOR_CAUSAL_LM_MAPPING, FLAX_MODEL_FOR_MASKED_LM_MAPPING,
    FLAX_MODEL_FOR_MULTIPLE_CHOICE_MAPPING, FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING,
    FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    FLAX_MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING, FLAX_MODEL_MAPPING, FlaxAutoModel,
    FlaxAutoModelForCausalLM, FlaxAutoModelForMaskedLM, FlaxAutoModelForMultipleChoice,
    FlaxAutoModelForQuestionAnswering, FlaxAutoModelForSeq2SeqLM,
    FlaxAutoModelForSequenceClassification, FlaxAutoModelForTokenClassification)
from flaxhf.models.bart import (
    FlaxBartForConditionalGeneration, FlaxBartForQuestionAnswering,
    FlaxBartForSequenceClassification, FlaxBartModel, FlaxBartPreTrainedModel,
    FlaxMarianModel, FlaxMarianMTModel, FlaxMarianPreTrainedModel, FlaxMBartForConditionalGeneration,
    FlaxMBartForQuestionAnswering, FlaxMBartForSequenceClassification, FlaxMBartModel,
    FlaxMBartPreTrainedModel)
from flaxhf.models.base import FlaxPreTrainedModel
from flaxhf.models.bert import (
    FlaxBertForMaskedLM, FlaxBertForMultipleChoice, FlaxBertForQuestionAnswering,
    FlaxBertForSequenceClassification, FlaxBertForTokenClassification, FlaxBertModel,
    FlaxElectraForMaskedLM, FlaxElectraForMultipleChoice, FlaxElectraForQuestionAnswering,
    FlaxElectraForSequenceClassification, FlaxElectraForTokenClassification, FlaxElectraModel,
    FlaxRobertaForMaskedLM, FlaxRobertaForMultipleChoice, FlaxRobertaForQuestionAnswering,
    FlaxRobertaForSequenceClassification, FlaxRobertaForTokenClassification, FlaxRobertaModel)
from flaxhf.models.distilbert import (
    FlaxDistilBertForMaskedLM, FlaxDistilBertForMultipleChoice, FlaxDistilBertForQuestionAnswering,
    FlaxDistilBertForSequenceClassification, FlaxDistilBertForTokenClassification,
    FlaxDistilBertModel, FlaxDistilBertPreTrainedModel)
from flaxhf.models.gemma import (
    FlaxGemma2ForCausalLM, FlaxGemma2ForSequenceClassification, FlaxGemma2ForTokenClassification,
    FlaxGemma2Model, FlaxGemma2PreTrainedModel, FlaxGemma3ForCausalLM,
    FlaxGemma3TextForSequenceClassification, FlaxGemma3TextModel, FlaxGemma3TextPreTrainedModel,
    FlaxGemmaForCausalLM, FlaxGemmaForSequenceClassification, FlaxGemmaForTokenClassification,
    FlaxGemmaModel, FlaxGemmaPreTrainedModel)
from flaxhf.models.gpt2 import (
    FlaxGPT2ForQuestionAnswering, FlaxGPT2ForSequenceClassification, FlaxGPT2ForTokenClassification,
    FlaxGPT2LMHeadModel, FlaxGPT2Model, FlaxGPT2PreTrainedModel)
from flaxhf.models.llama import (
    FlaxLlamaForCausalLM, FlaxLlamaForQuestionAnswering, FlaxLlamaForSequenceClassification,
    FlaxLlamaForTokenClassification, FlaxLlamaModel, FlaxLlamaPreTrainedModel,
    FlaxMistralForCausalLM, FlaxMistralForQuestionAnswering, FlaxMistralForSequenceClassification,
    FlaxMistralForTokenClassification, FlaxMistralModel, FlaxMistralPreTrainedModel,
    FlaxPhi3ForCausalLM, FlaxPhi3ForSequenceClassification, FlaxPhi3ForTokenClassification,
    FlaxPhi3Model, FlaxPhi3PreTrainedModel,
    FlaxQwen2ForCausalLM, FlaxQwen2ForQuestionAnswering, FlaxQwen2ForSequenceClassification,
    FlaxQwen2ForTokenClassification, FlaxQwen2Model, FlaxQwen2PreTrainedModel,
    FlaxQwen3ForCausalLM, FlaxQwen3ForQuestionAnswering, FlaxQwen3ForSequenceClassification,
    FlaxQwen3ForTokenClassification, FlaxQwen3Model, FlaxQwen3PreTrainedModel)
from flaxhf.models.t5 import (
    FlaxMT5EncoderModel, FlaxMT5ForConditionalGeneration, FlaxMT5Model, FlaxMT5PreTrainedModel,
    FlaxT5EncoderModel, FlaxT5ForConditionalGeneration, FlaxT5Model, FlaxT5PreTrainedModel)
from flaxhf.pipelines import pipeline

__version__ = "0.1.0"
