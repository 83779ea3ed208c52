"""Helpers for the demo notebooks (``notebooks/``): clear one-line failures, device report,
size presets, the example files, depth-coloured HTML.

A failed check raises ``NotebookError``, which IPython renders as its message alone (no
traceback), so a notebook cell stops with e.g. "Missing file: ..." instead of a JAX stack.
"""
import html
import os
import urllib.request

import jax
import numpy as np

SIZE_ENV = 'RLM_NOTEBOOK_SIZE'  # overrides a notebook's SIZE parameter (the CI runs 'tiny')
SIZES = ('colab', 'tiny')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NotebookError(Exception):
  """A failed notebook precondition; IPython shows only the message."""

  def _render_traceback_(self):
    return [f'{type(self).__name__}: {self}']


def size(default):
  """The notebook size: ``$RLM_NOTEBOOK_SIZE`` if set, else the parameter cell's ``default``."""
  value = os.environ.get(SIZE_ENV, default)
  if value not in SIZES:
    raise NotebookError(f'SIZE={value!r}: expected one of {SIZES}.')
  return value


def show_devices(want_accelerator):
  """Prints the devices; without an accelerator, a message saying what is missing (and raises
  when ``want_accelerator`` is True: the 'colab' size is too slow on a CPU)."""
  devices = jax.devices()
  platform = devices[0].platform
  print(f'{len(devices)} {platform.upper()} device(s): {devices}')
  if platform == 'cpu':
    message = ('No accelerator found: JAX sees only CPU devices. On Colab pick '
               'Runtime > Change runtime type > TPU (or a GPU) and rerun; or set SIZE = '
               "'tiny' to run on a CPU.")
    if want_accelerator:
      raise NotebookError(message)
    print(message)
  return devices


def require_file(path, what):
  """``path`` if it is a file, else a NotebookError naming ``what``."""
  if not path or not os.path.isfile(path):
    raise NotebookError(f'Missing file: {what} {path!r} does not exist.')
  return path


def require_columns(columns, present, path):
  """A NotebookError naming every column of ``columns`` not in ``present``."""
  missing = [c for c in columns if c and c not in present]
  if missing:
    raise NotebookError(f'Wrong CSV columns: {path!r} has no column(s) {missing}; its columns '
                        f'are {sorted(present)}.')


def repo_file(relative, repo_url):
  """A file of the repository: from this checkout if present (CI, ``pip install -e``), else
  downloaded from ``repo_url`` (a GitHub URL; raw file of branch main)."""
  local = os.path.join(REPO_ROOT, relative)
  if os.path.isfile(local):
    return local
  base = repo_url.rstrip('/').removesuffix('.git').replace('github.com',
                                                           'raw.githubusercontent.com')
  target = os.path.join('/tmp', os.path.basename(relative))
  try:
    urllib.request.urlretrieve(f'{base}/main/{relative}', target)
  except OSError as e:
    raise NotebookError(f'Missing file: {relative!r} is not in this checkout and could not '
                        f'be downloaded from {repo_url!r} ({e}).') from None
  return target


def depth_html(prompt, pieces, depths, num_depths):
  """HTML of ``prompt`` (plain) then text pieces, each on a background coloured by its depth
  (0 .. num_depths - 1), with a legend."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps['viridis']
  color = lambda d: matplotlib.colors.to_hex(cmap(0.25 + 0.75 * d / max(num_depths - 1, 1)))
  span = lambda text, d: (f'<span title="depth {d}" style="background:{color(d)};color:white;'
                          f'white-space:pre">{html.escape(text)}</span>')
  legend = ' '.join(span(f' {d} recursion(s) ', d) for d in range(num_depths))
  body = html.escape(prompt) + ''.join(span(p, int(d)) for p, d in zip(pieces, depths))
  return (f'<div style="font-family:monospace;line-height:1.6;white-space:pre">{legend}<hr>'
          f'{body}</div>')


def param_count(params):
  """Number of scalars in a parameter tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
