"""Generation settings: transformers' own `GenerationConfig`, resolved as `generate` resolves it.

Priority as in transformers: keyword arguments > the `generation_config` passed > the model's
`generation_config` (from generation_config.json or the model config) > global defaults. Settings
flaxhf does not implement are errors that name them, never silently ignored.
"""

import copy
import logging
from typing import Optional

from transformers import GenerationConfig

from flaxhf.generation import processors

log = logging.getLogger("flaxhf")

# Decoding strategies and outputs flaxhf does not implement, with the value that means "off".
_UNSUPPORTED = {
    "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0), "penalty_alpha": (None,),
    "constraints": (None,), "force_words_ids": (None,), "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,), "dola_layers": (None,), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "output_logits": (None, False),
    "cache_implementation": (None,), "low_memory": (None, False), "token_healing": (None, False),
    "stop_strings": (None,), "max_time": (None,), "compile_config": (None,),
}


def model_generation_config(model_config) -> GenerationConfig:
  """The default generation settings a model config implies (its special tokens)."""
  return GenerationConfig.from_model_config(model_config)


def resolve(model, generation_config: Optional[GenerationConfig], kwargs: dict):
  """(settings of one `generate` call, whether max_length is the global default); unknown or
  unsupported settings raise."""
  base = getattr(model, "generation_config", None) or model_generation_config(model.config)
  default_max_length = (kwargs.get("max_length") is None and base.max_length is None and (
      generation_config is None or generation_config.max_length is None))
  config = copy.deepcopy(generation_config if generation_config is not None else base)
  config.update(**base.to_dict(), defaults_only=True, allow_custom_entries=True)
  config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
  unknown = config.update(**kwargs)
  if unknown:
    raise TypeError(f"generate() got arguments that are neither model inputs nor GenerationConfig "
                    f"fields: {sorted(unknown)}.")
  for name, off in _UNSUPPORTED.items():
    if getattr(config, name, None) not in off:
      raise ValueError(f"generation setting {name}={getattr(config, name)!r} is not supported by "
                       f"flaxhf's generate; unset it (greedy, sampling and beam search are).")
  processors.check_supported(config)
  if isinstance(config.eos_token_id, int):
    config.eos_token_id = [config.eos_token_id]
  return config, default_max_length


def resolve_lengths(config: GenerationConfig, default_max_length: bool, prompt_len: int,
                    max_positions: Optional[int]):
  """Sets config.max_length / min_length from the prompt as transformers does; checks them."""
  if config.max_new_tokens is not None:
    if config.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={config.max_new_tokens}: generate at least one token "
                       "(max_new_tokens >= 1).")
    config.max_length = config.max_new_tokens + prompt_len
  elif default_max_length:  # transformers' default: 20 new tokens, within the model's positions
    config.max_length = config.max_length + prompt_len
    if max_positions is not None:
      config.max_length = min(config.max_length, max_positions)
  if config.min_new_tokens is not None:
    config.min_length = config.min_new_tokens + prompt_len
  if max_positions is not None and prompt_len > max_positions:
    raise ValueError(f"The prompt has {prompt_len} tokens but the model has {max_positions} "
                     "positions: truncate the prompt (tokenizer truncation=True, max_length=...).")
  if prompt_len >= config.max_length:
    raise ValueError(f"The prompt has {prompt_len} tokens but max_length is {config.max_length}: "
                     "nothing is left to generate. Set max_new_tokens instead.")
  if max_positions is not None and config.max_length > max_positions:
    raise ValueError(f"prompt ({prompt_len} tokens) + new tokens reach {config.max_length}, beyond "
                     f"the model's {max_positions} positions: lower max_new_tokens to at most "
                     f"{max_positions - prompt_len}.")
  return config


def check_strategy(config: GenerationConfig):
  """Errors for beam/return-sequence combinations transformers rejects too."""
  beams, n = config.num_beams or 1, config.num_return_sequences or 1
  if beams > 1 and n > beams:
    raise ValueError(f"num_return_sequences={n} is more than num_beams={beams}: beam search "
                     "returns at most num_beams sequences; raise num_beams or lower "
                     "num_return_sequences.")
  if beams == 1 and not config.do_sample and n > 1:
    raise ValueError(f"num_return_sequences={n} with greedy search would return {n} copies of one "
                     "sequence: use do_sample=True or num_beams >= num_return_sequences.")
  if config.early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping={config.early_stopping!r} must be True, False or 'never'.")
