"""mBART lives in flaxhf.models.bart; this module keeps transformers v4's import path and its
two-argument `shift_tokens_right` (v4 scripts import it from the model's module)."""

from flaxhf.models.bart import (  # noqa: F401
    FlaxMBartForConditionalGeneration, FlaxMBartForQuestionAnswering,
    FlaxMBartForSequenceClassification, FlaxMBartModel, FlaxMBartPreTrainedModel)
from flaxhf.models.bart import mbart_shift_tokens_right as shift_tokens_right  # noqa: F401
