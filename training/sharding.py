"""Meshes and logical-axis sharding: the single place model dimensions meet mesh axes.

Model code names logical axes ('embed', 'mlp', 'heads', ...); ``config.sharding_rules``
maps each to mesh axes of ``('data', 'fsdp', 'tensor')``. A dimension that a rule's mesh
axes do not divide evenly is replicated instead (e.g. 5 KV heads on a tensor axis of 2),
so every paper-scale shape runs on any mesh.
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
)


def make_mesh(mesh_config, devices=None):
  """Mesh with axes ('data', 'fsdp', 'tensor'); one size may be -1 (all remaining devices)."""
  devices = jax.devices() if devices is None else devices
  sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not divide '
                       f'{len(devices)} devices.')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices; {len(devices)} are available.')
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def rules_from_config(config):
  rules = config.get('sharding_rules', None)
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax)
               for name, ax in (rules or DEFAULT_RULES))


def _spec_for(names, shape, mesh, rules):
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axes = table.get(name)
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(boxed_tree, mesh, rules):
  """NamedShardings for a (possibly abstract) tree of ``nn.LogicallyPartitioned`` boxes.

  Unboxed leaves (scalars, step counters) are replicated.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, _spec_for(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch, mesh):
  """Places this process's slice of the global batch onto the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)
