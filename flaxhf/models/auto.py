"""Auto classes: pick the flaxhf class for a checkpoint from `config.model_type`."""

import copy

from flaxhf.models import io
from flaxhf.models.base import REGISTRY


class _AutoModel:
  task = None

  def __init__(self, *args, **kwargs):
    raise TypeError(f"{type(self).__name__} is built with from_pretrained(...) or from_config(...).")

  @classmethod
  def model_class_for(cls, config):
    by_type = REGISTRY.get(cls.task, {})
    if config.model_type not in by_type:
      raise ValueError(
          f"flaxhf has no {cls.__name__[len('FlaxAutoModel'):] or 'base'} model for model_type "
          f"{config.model_type!r}. Supported model types: {sorted(by_type)}.")
    return by_type[config.model_type]

  @classmethod
  def from_config(cls, config, **kwargs):
    """A randomly initialised model of the class matching `config`."""
    return cls.model_class_for(config)(config, **kwargs)

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
    """Loads the checkpoint with the flaxhf class its config names."""
    if config is None:
      hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
      model_dir = io.resolve_model_dir(pretrained_model_name_or_path, **hub)
      try:
        config = io.load_config(model_dir)
      except ValueError as e:
        raise ValueError(f"{e}\nflaxhf supports model types {sorted(REGISTRY.get(cls.task, {}))}.") from e
      pretrained_model_name_or_path = model_dir
    else:
      config = copy.deepcopy(config)
    return cls.model_class_for(config).from_pretrained(pretrained_model_name_or_path, *args,
                                                       config=config, **kwargs)


class FlaxAutoModel(_AutoModel):
  task = None


class FlaxAutoModelForSequenceClassification(_AutoModel):
  task = "sequence_classification"


class FlaxAutoModelForTokenClassification(_AutoModel):
  task = "token_classification"


class FlaxAutoModelForQuestionAnswering(_AutoModel):
  task = "question_answering"


class FlaxAutoModelForMultipleChoice(_AutoModel):
  task = "multiple_choice"


class FlaxAutoModelForMaskedLM(_AutoModel):
  task = "masked_lm"
