"""The error a bad config raises, shared by every layer that reads a config.

``launch.main`` prints a ``ConfigError`` as one line (no traceback): it is the user's
input that is wrong, not the code.
"""
import difflib


class ConfigError(ValueError):
  """A config field with a value that cannot run, named in the message."""


def unknown_fields(where: str, unknown, known) -> ConfigError:
  """A ConfigError naming each unknown field of ``where`` with its nearest valid names."""
  parts = []
  for name in sorted(unknown):
    near = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
    parts.append(f'{where}.{name}' + (f' (did you mean {", ".join(near)}?)' if near else ''))
  return ConfigError(f'Unknown config field(s): {"; ".join(parts)}. Valid fields of {where}: '
                     f'{", ".join(sorted(known))}.')
