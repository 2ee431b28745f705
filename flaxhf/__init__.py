"""flaxhf: Flax versions of the transformers models, a sharded trainer, and PyTorch export."""

from flaxhf.models.albert import (
    FlaxAlbertForMaskedLM, FlaxAlbertForMultipleChoice, FlaxAlbertForQuestionAnswering,
    FlaxAlbertForSequenceClassification, FlaxAlbertForTokenClassification, FlaxAlbertModel,
    FlaxAlbertPreTrainedModel)
from flaxhf.models.auto import (FlaxAutoModel, FlaxAutoModelForMaskedLM,
                                FlaxAutoModelForMultipleChoice, FlaxAutoModelForQuestionAnswering,
                                FlaxAutoModelForSequenceClassification,
                                FlaxAutoModelForTokenClassification)
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
from flaxhf.pipelines import pipeline

__version__ = "0.1.0"
