"""Errors in what a user asked for, as opposed to bugs: the launcher prints these without a traceback.

Each also subclasses the builtin a caller would catch (ValueError, FileNotFoundError, OSError), so
code that catches the builtin keeps working.
"""


class UserError(Exception):
  """A problem with the request (data, model folder, hub access, config) whose message says the fix."""


class ConfigError(UserError, ValueError):
  """A config or config arg that names something that does not exist."""


class ModelNotFoundError(UserError, FileNotFoundError):
  """A local model folder, config.json or weights file that is not there."""


class HubError(UserError, OSError):
  """A hub id that cannot be fetched: offline, unreachable, no such repo, or a corrupt download."""


class MissingPackageError(UserError, ImportError):
  """An optional package that the asked-for feature needs is not installed."""
