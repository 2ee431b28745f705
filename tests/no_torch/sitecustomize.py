"""Read at start-up by the processes that tests launch (tests/engine_utils.child_env puts this
folder first on their PYTHONPATH): torch is hidden from them, as it is absent from a user's JAX-only
training environment. Training never needs torch, and so the CLI runs prove it; with torch
installed, transformers' configuration modules would import all of it (~2.5 s of CPU in every
process start, most of a test's start-up)."""

import importlib.machinery

_find_spec = importlib.machinery.PathFinder.find_spec


def _find_spec_but_torch(name, path=None, target=None):
  if name == "torch" or name.startswith("torch."):
    return None  # find_spec says absent; `import torch` raises ModuleNotFoundError
  return _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = staticmethod(_find_spec_but_torch)
