"""Conversions between the loop (``layers_0`` ... ``layers_{L-1}``) and scanned (``layers``
stacked on a leading [L] axis) parameter layouts of a decoder's layer stack."""
import re

import jax
import jax.numpy as jnp
import numpy as np


def stack_layers(params, prefix='layers'):
  """Loop layout -> scanned layout: ``{prefix}_{i}`` subtrees stacked under ``prefix``.

  Other top-level entries are kept as they are. Raises ValueError if the layer indices
  are not exactly 0..L-1 or the layers' trees differ.
  """
  pattern = re.compile(rf'{re.escape(prefix)}_(\d+)$')
  indices = sorted(int(m.group(1)) for m in map(pattern.match, params) if m)
  if not indices:
    raise ValueError(f'No {prefix}_<i> entries to stack; top-level keys: {sorted(params)}.')
  if indices != list(range(len(indices))):
    raise ValueError(f'{prefix}_<i> indices must be 0..{len(indices) - 1}; got {indices}.')
  layers = [params[f'{prefix}_{i}'] for i in indices]
  structure = jax.tree_util.tree_structure(layers[0])
  for i, layer in enumerate(layers):
    if jax.tree_util.tree_structure(layer) != structure:
      raise ValueError(f'{prefix}_{i} has a different parameter tree than {prefix}_0.')
  out = {k: v for k, v in params.items() if not pattern.match(k)}
  out[prefix] = jax.tree.map(_stack, *layers)
  return out


def _stack(*xs):
  """Host (numpy) arrays stay on the host; anything else is stacked by jax."""
  return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)


def unstack_layers(params, num_layers, prefix='layers'):
  """Scanned layout -> loop layout: ``prefix`` [L, ...] split into ``{prefix}_{i}``."""
  if prefix not in params:
    raise ValueError(f'No {prefix!r} entry to unstack; top-level keys: {sorted(params)}.')
  stacked = params[prefix]
  for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
    if leaf.shape[:1] != (num_layers,):
      raise ValueError(f'{prefix}{jax.tree_util.keystr(path)} has shape {leaf.shape}; '
                       f'expected a leading axis of num_layers={num_layers}.')
  out = {k: v for k, v in params.items() if k != prefix}
  for i in range(num_layers):
    out[f'{prefix}_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
