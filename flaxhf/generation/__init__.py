"""Generation shared by every generative family: one compiled decode loop, transformers' settings."""

from flaxhf.generation.generate import GenerateOutput, GenerationMixin  # noqa: F401
