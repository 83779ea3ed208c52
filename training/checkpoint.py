"""Orbax checkpointing of the train state and every process's data-iterator position.

Layout: ``workdir/checkpoints/<step>/{state,data}``; ``data`` holds one file per process
(``process_<i>-of-<n>.json``, written by every process, as grain's own handler does), so
each process of a multi-host run resumes its own shard at its own position. Iterator
states are JSON with tuples tagged: grain's packing state holds tuples that a plain JSON
round trip turns into lists (after which ``ConcatThenSplitIterDataset`` resumes at the
wrong place). Restore goes through an abstract target with explicit shardings, so a
checkpoint restores onto a different mesh; the saved parameter shapes are compared with
the model's first, and a mismatch raises naming the parameter with nothing touched.
A latest checkpoint that cannot be read (empty or corrupt) is moved to
``checkpoints_unreadable/`` (kept, not deleted) and the previous step is restored, with a
warning naming what was skipped.
"""
import dataclasses
import json
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from training import workdir as workdir_lib

# Orbax splits each replicated array's writing across its replicas ("replica-parallel"),
# which costs a compiled slice per device and array shape. Below this size a slice is not
# worth that: the first replica writes the array whole. Larger arrays keep the split.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20
# The default handler's metadata store is kept (orbax exposes it only as an attribute).
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array),
                                 '_array_metadata_store', None),
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES), override=True)


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


def encode_state(obj):
  """JSON-ready copy of an iterator state with tuples tagged (see module docstring)."""
  if isinstance(obj, tuple):
    return {'__tuple__': [encode_state(x) for x in obj]}
  if isinstance(obj, list):
    return [encode_state(x) for x in obj]
  if isinstance(obj, dict):
    return {k: encode_state(v) for k, v in obj.items()}
  return obj


def decode_state(obj):
  """Inverse of ``encode_state``."""
  if isinstance(obj, dict):
    if set(obj) == {'__tuple__'}:
      return tuple(decode_state(x) for x in obj['__tuple__'])
    return {k: decode_state(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [decode_state(x) for x in obj]
  return obj


class ProcessStateHandler(ocp.CheckpointHandler):
  """Saves each process's JSON state in its own file; restores this process's."""

  @staticmethod
  def _file(directory, index=None, count=None):
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return directory / f'process_{index}-of-{count}.json'

  def save(self, directory, args):
    self._file(directory).write_text(json.dumps(encode_state(args.state)))

  def restore(self, directory, args=None):
    file = self._file(directory)
    if not file.exists():
      saved = sorted(p.name for p in directory.iterdir())
      raise ValueError(f'{directory} holds no data-iterator state for process '
                       f'{jax.process_index()} of {jax.process_count()} (it has {saved}): '
                       'resume with the process count the run was saved with.')
    return decode_state(json.loads(file.read_text()))

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Keeps the last ``keep`` checkpoints of ``{'state': train state, 'data': iterator state}``."""

  def __init__(self, workdir, keep=3, async_save=True, create=True):
    self.directory = workdir_lib.path(workdir) / 'checkpoints'
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                             enable_async_checkpointing=async_save),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ProcessStateHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, data_state=None, force=False):
    """Saves ``state`` (and ``data_state``, an iterator's ``get_state()``) at ``step``."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ProcessStateSave(data_state)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def check_shapes(self, step, abstract_params, saved=None):
    """Raises ValueError if the saved params' shapes (``saved``, read from the checkpoint's
    metadata when not given) differ from ``abstract_params``."""
    saved = self._saved_shapes(step) if saved is None else saved
    wanted = flat_shapes(abstract_params)
    problems = [f'{k}: checkpoint {saved.get(k)} vs model {wanted.get(k)}'
                for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if problems:
      raise ValueError(
          f'Checkpoint at {self.directory}/{step} does not match the configured model '
          f'({len(problems)} parameter(s) differ): ' + '; '.join(problems[:5]) +
          '. Use a fresh --workdir or the config the checkpoint was trained with.')

  def _saved_shapes(self, step):
    return flat_shapes(self.manager.item_metadata(step)['state'].tree['params'])

  def restore(self, step, abstract_state, with_data=False):
    """(state, data_state or None) of ``step``, restored onto ``abstract_state``
    (ShapeDtypeStructs with shardings)."""
    self.check_shapes(step, abstract_state['params'])
    return self._restore(step, abstract_state, with_data)

  def _restore(self, step, abstract_state, with_data):
    # A step saved without a data state (e.g. from batches without ``get_state``) has none.
    with_data = with_data and (self.directory / str(step) / 'data').exists()
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items['data'] = ProcessStateRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state'], restored.get('data') if with_data else None

  def restore_latest_readable(self, abstract_state, with_data=False):
    """Restores the newest readable step: (step, state, data_state), or None if none.

    A step that fails to read (not a shape mismatch, which raises) is moved aside to
    ``checkpoints_unreadable/<step>`` with a warning, and the previous one is tried.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved = self._saved_shapes(step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      self.check_shapes(step, abstract_state['params'], saved)  # A mismatch is the user's.
      try:
        return (step, *self._restore(step, abstract_state, with_data))
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
    return None

  def _set_aside(self, step, error):
    target = self.directory.parent / 'checkpoints_unreadable' / str(step)
    logging.warning('Checkpoint %s/%d is unreadable (%s: %s); moving it to %s and trying the '
                    'previous step.', self.directory, step, type(error).__name__,
                    str(error)[:300], target)
    if workdir_lib.is_primary():
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_model(workdir, step=None):
  """(module, variables) of a workdir of ours: the family of its ``config.json`` and the
  ``params`` (plus any ``model_state`` collections, e.g. MoR's ``router_state``) of
  checkpoint ``step`` (default: the latest), as arrays in their saved dtypes."""
  from model.registry import build_model  # pylint: disable=g-import-not-at-top
  saved = workdir_lib.read_config(workdir)
  if saved is None:
    raise FileNotFoundError(f'{workdir!r} is not a workdir: '
                            f'{workdir_lib.path(workdir) / workdir_lib.CONFIG_FILE} not found.')
  model = build_model(ml_collections.ConfigDict(saved['model']))
  checkpointer = Checkpointer(workdir, async_save=False, create=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{workdir!r} has no checkpoint.')
  restored = checkpointer.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  checkpointer.close()
  state = restored['state']
  variables = {'params': state['params'], **state.get('model_state', {})}
  return model, jax.tree.map(jnp.asarray, variables)
