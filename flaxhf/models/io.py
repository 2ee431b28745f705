"""Finding and reading Hugging Face model folders: local paths, the hub cache, safetensors and .bin."""

import json
import os
from typing import Dict, Optional

import numpy as np

from flaxhf.errors import HubError, MissingPackageError, ModelNotFoundError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"

# Files `from_pretrained` may fetch from the hub; tokenizer files ride along so the folder is usable.
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model.bin*",
                 "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "*.model",
                 "spiece.model", "sentencepiece*", "source.spm", "target.spm", "generation_config.json"]


def names_a_model_type(name: Optional[str]) -> bool:
  """`name` is a transformers model type ("llama"), not a folder or file: its defaults are the
  config (AutoConfig.for_model, no download)."""
  from transformers import CONFIG_MAPPING
  return bool(name) and not os.path.exists(name) and name in CONFIG_MAPPING


def hub_offline() -> bool:
  return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name_or_path: str, *, revision: Optional[str] = None,
                      cache_dir: Optional[str] = None, token=None,
                      local_files_only: bool = False) -> str:
  """Returns a local folder holding `name_or_path`: the folder itself, or a hub snapshot."""
  name_or_path = os.fspath(name_or_path)
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
    raise ModelNotFoundError(
        f"{name_or_path!r} is not a model folder. Pass a folder holding config.json and weights "
        f"(model.safetensors or pytorch_model.bin), or a Hugging Face hub id such as 'bert-base-uncased'.")
  import huggingface_hub  # imported late: only hub ids need it
  offline = local_files_only or hub_offline()
  try:
    return huggingface_hub.snapshot_download(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token,
        allow_patterns=_HUB_PATTERNS, local_files_only=offline)
  except Exception as e:  # the hub client raises many types: name them all one way
    why = ("the hub is offline (HF_HUB_OFFLINE=1 or local_files_only=True) and it is not in the cache"
           if offline else f"the hub could not be reached or has no such repo ({type(e).__name__}: {e})")
    raise HubError(
        f"Cannot load {name_or_path!r}: {why}. Either download it where the network is reachable "
        f"(`huggingface-cli download {name_or_path}`) into the cache, or pass a local folder "
        f"that holds config.json and model.safetensors.") from e


def load_config(model_dir: str):
  """The transformers config in a model folder, with a clear error when it is absent or unreadable."""
  if not os.path.isfile(os.path.join(model_dir, CONFIG)):
    raise ModelNotFoundError(
        f"No {CONFIG} in {model_dir}: the folder needs the checkpoint's config. Copy it there, or "
        f"pass config=transformers.AutoConfig.from_pretrained(...) to from_pretrained.")
  from transformers import AutoConfig  # imported late: pure Python, but slow to import
  try:
    return AutoConfig.from_pretrained(model_dir)
  except (ValueError, KeyError) as e:  # transformers' words for an unknown model_type
    raise ValueError(f"Cannot read the config in {model_dir}: {e}") from e


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:
    raise HubError(f"Cannot read {path}: the safetensors file is corrupt or truncated ({e}). "
                  f"Re-download or re-export it.") from e


def _load_torch_bin(path: str) -> Dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise MissingPackageError(
        f"{path} is a PyTorch pickle; reading it needs torch (`pip install torch==2.13.0`). "
        f"Or convert the checkpoint to model.safetensors once where torch is installed.") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
          for k, v in state.items()}


def load_state_dict(model_dir: str) -> Dict[str, np.ndarray]:
  """Reads every tensor of a model folder into numpy, whichever supported format it uses."""
  def path(name):
    return os.path.join(model_dir, name)

  if os.path.isfile(path(SAFE_WEIGHTS)):
    return _load_safetensors(path(SAFE_WEIGHTS))
  for index_name, loader in ((SAFE_INDEX, _load_safetensors), (PT_INDEX, _load_torch_bin)):
    if os.path.isfile(path(index_name)):
      with open(path(index_name)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      state = {}
      for shard in shards:
        if not os.path.isfile(path(shard)):
          raise ModelNotFoundError(f"{index_name} in {model_dir} names shard {shard}, which is missing.")
        state.update(loader(path(shard)))
      return state
  if os.path.isfile(path(PT_WEIGHTS)):
    return _load_torch_bin(path(PT_WEIGHTS))
  present = sorted(os.listdir(model_dir))
  raise ModelNotFoundError(
      f"No weights in {model_dir}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} or {PT_WEIGHTS}; "
      f"found {present}. To start from random weights instead, build the model from its config: "
      f"flaxhf.FlaxAutoModel.from_config(transformers.AutoConfig.from_pretrained(path)).")


def save_safetensors(state: Dict[str, np.ndarray], model_dir: str):
  from safetensors.numpy import save_file
  os.makedirs(model_dir, exist_ok=True)
  tmp = os.path.join(model_dir, SAFE_WEIGHTS + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(model_dir, SAFE_WEIGHTS))  # never a half-written weights file
