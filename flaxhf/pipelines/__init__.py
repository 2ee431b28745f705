"""`flaxhf.pipeline(task, model=..., tokenizer=...)`: transformers-style inference on the Flax models."""

import glob
import os

import jax.numpy as jnp

from flaxhf.models import auto, io
from flaxhf.models.base import FlaxPreTrainedModel
from flaxhf.pipelines.base import Pipeline
from flaxhf.pipelines.fill_mask import FillMaskPipeline
from flaxhf.pipelines.question_answering import QuestionAnsweringPipeline
from flaxhf.pipelines.text2text import (SummarizationPipeline, Text2TextGenerationPipeline,
                                        TranslationPipeline, parse_translation_task)
from flaxhf.pipelines.text_classification import TextClassificationPipeline
from flaxhf.pipelines.text_generation import TextGenerationPipeline
from flaxhf.pipelines.token_classification import TokenClassificationPipeline

TASKS = {
    "text-classification": (TextClassificationPipeline, auto.FlaxAutoModelForSequenceClassification),
    "token-classification": (TokenClassificationPipeline, auto.FlaxAutoModelForTokenClassification),
    "question-answering": (QuestionAnsweringPipeline, auto.FlaxAutoModelForQuestionAnswering),
    "fill-mask": (FillMaskPipeline, auto.FlaxAutoModelForMaskedLM),
    "text-generation": (TextGenerationPipeline, auto.FlaxAutoModelForCausalLM),
    "text2text-generation": (Text2TextGenerationPipeline, auto.FlaxAutoModelForSeq2SeqLM),
    "summarization": (SummarizationPipeline, auto.FlaxAutoModelForSeq2SeqLM),
    "translation": (TranslationPipeline, auto.FlaxAutoModelForSeq2SeqLM),
}
_TOKENIZER_FILES = ("tokenizer*.json", "vocab*", "*.model", "merges.txt")
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}


def _load_tokenizer(tokenizer, model_dir, use_fast):
  if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer
  source = tokenizer or model_dir
  if source is None:
    raise ValueError("The model was passed loaded, so its folder is unknown: pass tokenizer= (a "
                     "tokenizer, or the folder or hub id it loads from).")
  if os.path.isdir(source) and not any(glob.glob(os.path.join(source, pattern))
                                       for pattern in _TOKENIZER_FILES):
    # transformers 5 would quietly build an empty tokenizer here, and the pipeline would answer nonsense.
    raise OSError(f"No tokenizer files in {os.fspath(source)!r}: save the tokenizer there "
                  f"(tokenizer.save_pretrained(...)) or pass tokenizer=.")
  from transformers import AutoTokenizer  # imported late: slow to import
  try:
    return AutoTokenizer.from_pretrained(os.fspath(source), use_fast=use_fast)
  except (OSError, ValueError) as e:
    raise OSError(f"Cannot load a tokenizer from {os.fspath(source)!r} ({e}). Save one there with "
                  f"tokenizer.save_pretrained(...), or pass tokenizer=.") from e


def pipeline(task: str, model=None, tokenizer=None, *, dtype=jnp.float32, use_fast: bool = True,
             model_kwargs=None, **kwargs) -> Pipeline:
  """A pipeline for `task` on a flaxhf model (folder, hub id, or loaded model); kwargs set its defaults.

  kwargs: batch_size, pad_to_multiple_of, and the task's call parameters (top_k, aggregation_strategy,
  doc_stride, targets, ...; for text-generation any GenerationConfig field), which each call may
  override.
  """
  name = ALIASES.get(task, task)
  if name.startswith("translation_"):  # v4's translation_XX_to_YY: the direction, checked before loading
    parse_translation_task(name)
    kwargs["task"], name = name, "translation"
  if name not in TASKS:
    raise ValueError(f"Unknown task {task!r}. flaxhf pipelines support: {sorted(TASKS)}, "
                     f"translation_XX_to_YY (aliases: "
                     f"{', '.join(f'{a} -> {t}' for a, t in sorted(ALIASES.items()))}).")
  pipeline_class, auto_class = TASKS[name]
  if model is None:
    raise ValueError(f"pipeline({task!r}) needs model= (a model folder, a hub id, or a loaded flaxhf "
                     "model): flaxhf picks no default checkpoint.")
  model_dir = None
  if isinstance(model, (str, os.PathLike)):
    model_dir = io.resolve_model_dir(model)  # a hub id fails here, clearly, when offline
    model = auto_class.from_pretrained(model_dir, dtype=dtype, **(model_kwargs or {}))
  elif not isinstance(model, FlaxPreTrainedModel):
    raise TypeError(f"model= must be a folder, a hub id or a flaxhf model; got {type(model).__name__}.")
  elif tokenizer is None:
    # A model from from_pretrained remembers its folder in the config, as transformers' do.
    path = getattr(model.config, "_name_or_path", "") or ""
    model_dir = path if path and os.path.isdir(path) else None
  return pipeline_class(model, _load_tokenizer(tokenizer, model_dir, use_fast), **kwargs)


__all__ = ["pipeline", "Pipeline", "TASKS", "ALIASES", "FillMaskPipeline", "QuestionAnsweringPipeline",
           "SummarizationPipeline", "Text2TextGenerationPipeline", "TextClassificationPipeline",
           "TextGenerationPipeline", "TokenClassificationPipeline", "TranslationPipeline"]
