"""Orbax checkpointing of the train state and the grain iterator, with a shape check.

Layout: ``workdir/checkpoints/<step>/{state,data}``. Restore goes through an abstract
target carrying explicit shardings, so a checkpoint restores onto a different mesh.
The data iterator's state is stored as JSON with tuples tagged, because grain's packing
state holds tuples that a plain JSON round trip turns into lists (after which grain's
``ConcatThenSplitIterDataset`` resumes at the wrong place).
Before restoring, the saved parameter shapes are compared with the model's; a mismatch
raises naming the parameter, and nothing in the workdir is touched.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp


def _path_str(path):
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def flat_shapes(tree):
  """{'a/b/c': shape} for every leaf with a ``shape``."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(p): tuple(v.shape) for p, v in leaves if hasattr(v, 'shape')}


def _encode(obj):
  if isinstance(obj, tuple):
    return {'__tuple__': [_encode(x) for x in obj]}
  if isinstance(obj, list):
    return [_encode(x) for x in obj]
  if isinstance(obj, dict):
    return {k: _encode(v) for k, v in obj.items()}
  return obj


def _decode(obj):
  if isinstance(obj, dict):
    if set(obj) == {'__tuple__'}:
      return tuple(_decode(x) for x in obj['__tuple__'])
    return {k: _decode(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(x) for x in obj]
  return obj


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of ``{'state': TrainState-dict, 'data': iterator}``."""

  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_iter=None, force=False):
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = ocp.args.JsonSave(_encode(data_iter.get_state()))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_shapes(self, step, abstract_params):
    """Raises ValueError if the saved params' shapes differ from ``abstract_params``."""
    saved = flat_shapes(self.manager.item_metadata(step)['state'].tree['params'])
    wanted = flat_shapes(abstract_params)
    problems = [f'{k}: checkpoint {saved.get(k)} vs model {wanted.get(k)}'
                for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if problems:
      raise ValueError(
          f'Checkpoint at {self.directory}/{step} does not match the configured model '
          f'({len(problems)} parameter(s) differ): ' + '; '.join(problems[:5]) +
          '. Use a fresh --workdir or the config the checkpoint was trained with.')

  def restore(self, step, abstract_state, data_iter=None):
    """Restores onto ``abstract_state`` (ShapeDtypeStructs with shardings)."""
    self.check_shapes(step, abstract_state['params'])
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(_decode(restored['data']))
    return restored['state']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_model(workdir, step=None):
  """(module, variables) of a workdir of ours: the family of its ``config.json`` and the
  ``params`` (plus any ``model_state`` collections, e.g. MoR's ``router_state``) of
  checkpoint ``step`` (default: the latest), as arrays in their saved dtypes."""
  from model.registry import build_model  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir!r} is not a workdir: {path} not found.')
  with open(path) as f:
    model = build_model(ml_collections.ConfigDict(json.load(f)['model']))
  checkpointer = Checkpointer(workdir, async_save=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir!r} has no checkpoint.')
  restored = checkpointer.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  checkpointer.close()
  state = restored['state']
  variables = {'params': state['params'], **state.get('model_state', {})}
  return model, jax.tree.map(jnp.asarray, variables)
