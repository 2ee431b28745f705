"""Marian lives in flaxhf.models.bart; this module keeps transformers v4's import path
(v4 scripts import `shift_tokens_right` from the model's module)."""

from flaxhf.models.bart import (  # noqa: F401
    FlaxMarianModel, FlaxMarianMTModel, FlaxMarianPreTrainedModel, shift_tokens_right)
