"""flaxhf model families; importing this registers every family with the auto classes."""

from flaxhf.models import albert, bart, bert, distilbert, gpt2, t5  # noqa: F401
