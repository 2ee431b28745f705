"""Auto classes: pick the flaxhf class for a checkpoint from `config.model_type`."""

import collections.abc
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
  def from_config(cls, config, trust_remote_code: bool = False, **kwargs):
    """A randomly initialised model of the class matching `config` (v4: seed, dtype, _do_init, input_shape)."""
    if trust_remote_code:
      raise ValueError("trust_remote_code=True is not supported: flaxhf runs only its own model code. "
                       "Drop the argument; flaxhf.FlaxAutoModel... lists the model types it implements.")
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


class FlaxAutoModelForCausalLM(_AutoModel):
  task = "causal_lm"


class FlaxAutoModelForSeq2SeqLM(_AutoModel):
  task = "seq2seq_lm"


class _TaskMapping(collections.abc.Mapping):
  """transformers v4's FLAX_MODEL_*_MAPPING: config class -> flaxhf class, read live from REGISTRY."""

  def __init__(self, task):
    self.task = task

  def _table(self):
    return {cls.config_class: cls for cls in REGISTRY.get(self.task, {}).values()}

  def __getitem__(self, config_class):
    table = self._table()
    if config_class not in table:
      raise KeyError(f"flaxhf has no {self.task or 'base'} model for {config_class!r}; it has "
                     f"{sorted(c.__name__ for c in table)}.")
    return table[config_class]

  def __iter__(self):
    return iter(self._table())

  def __len__(self):
    return len(self._table())

  def __repr__(self):
    return f"_TaskMapping({self.task!r}, {self._table()!r})"


FLAX_MODEL_MAPPING = _TaskMapping(None)
FLAX_MODEL_FOR_MASKED_LM_MAPPING = _TaskMapping("masked_lm")
FLAX_MODEL_FOR_CAUSAL_LM_MAPPING = _TaskMapping("causal_lm")
FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING = _TaskMapping("seq2seq_lm")
FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING = _TaskMapping("sequence_classification")
FLAX_MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING = _TaskMapping("token_classification")
FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING = _TaskMapping("question_answering")
FLAX_MODEL_FOR_MULTIPLE_CHOICE_MAPPING = _TaskMapping("multiple_choice")
