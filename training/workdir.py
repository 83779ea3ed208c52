"""The workdir: local or cloud paths, a lock against concurrent runs, and the saved config.

Every read and write of a workdir goes through ``etils.epath``, so ``--workdir=gs://b/run``
stays a cloud path (``os.path.abspath`` would turn it into a local directory). Process 0
writes the shared files (``config.json``, the tokenizer, metrics, the lock); every process
reads them.

``config.json`` holds the run's config plus ``resume_history``: resuming checks the whole
saved config against the new one. Fields that change the model, the tokenizer, the data
stream or the optimizer (``GUARDED``) may not change silently: the run stops with an error
listing them unless ``config.allow_config_change`` is set, and then the change is recorded
in ``resume_history`` and ``config.json`` holds the new values (``load_model`` rebuilds the
model that was trained last).
"""
import datetime
import json
import os
import socket
import threading
import time

from absl import logging
from etils import epath
import jax

from model.config_errors import ConfigError

CONFIG_FILE = 'config.json'
LOCK_FILE = 'RUN.lock'
HISTORY_KEY = 'resume_history'
# Dotted prefixes of fields whose change alters the model, tokenizer, data stream or optimizer.
GUARDED = ('model.', 'tokenizer.', 'data.', 'seed', 'uptrain.', 'train.learning_rate',
           'train.schedule', 'train.warmup_steps', 'train.decay_fraction', 'train.min_lr_ratio',
           'train.weight_decay', 'train.b1', 'train.b2', 'train.eps', 'train.grad_clip',
           'train.grad_accum', 'train.z_loss', 'train.trainable')


def path(workdir) -> epath.Path:
  """The workdir as an ``epath.Path``; a local relative path becomes absolute."""
  text = os.fspath(workdir)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def is_primary() -> bool:
  return jax.process_index() == 0


def write_text(file: epath.Path, text: str) -> None:
  """Writes ``text`` (process 0 only) through a temporary file, so readers never see half."""
  if not is_primary():
    return
  file.parent.mkdir(parents=True, exist_ok=True)
  tmp = file.parent / f'.{file.name}.tmp'
  tmp.write_text(text)
  tmp.replace(file)


# ---------------------------------------------------------------------------------------
# The saved config and resume checks.
# ---------------------------------------------------------------------------------------
def _flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def _json_normal(config) -> dict:
  """The config as plain JSON values (tuples become lists), without the resume history."""
  values = json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') \
      else json.loads(json.dumps(config))
  values.pop(HISTORY_KEY, None)
  return values


def config_changes(saved: dict, config) -> dict:
  """{dotted field: (saved, new)} for guarded fields that differ (absent: None)."""
  old, new = _flatten(_json_normal(saved)), _flatten(_json_normal(config))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k.startswith(GUARDED)}


def read_config(workdir) -> dict | None:
  """The saved ``config.json`` of a workdir (with its history), or None."""
  file = path(workdir) / CONFIG_FILE
  return json.loads(file.read_text()) if file.exists() else None


def record_config(workdir, config, step, write=True) -> None:
  """Checks ``config`` against the workdir's saved config, then (``write``) saves it with
  process 0 (a resuming job checks before its restore and writes after it).

  Raises ConfigError listing the guarded fields that changed, unless
  ``config.allow_config_change``; allowed changes are appended to ``resume_history``.
  """
  saved = read_config(workdir)
  history = [] if saved is None else saved.get(HISTORY_KEY, [])
  if saved is not None:
    changes = config_changes(saved, config)
    if changes and not config.get('allow_config_change', False):
      listed = '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())
      raise ConfigError(
          f'{workdir} was trained with a different config; changed field(s): {listed}. '
          'Use a fresh --workdir, or pass --config.allow_config_change=True to resume anyway '
          '(the change is recorded in config.json).')
    if changes and write:
      logging.warning('Resuming %s with changed fields (recorded): %s', workdir, changes)
      history.append({'step': int(step), 'time': _now(),
                      'changes': {k: [a, b] for k, (a, b) in changes.items()}})
  if not write:
    return
  values = _json_normal(config)
  values[HISTORY_KEY] = history
  write_text(path(workdir) / CONFIG_FILE, json.dumps(values, indent=2))


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


# ---------------------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------------------
class WorkdirLock:
  """One live run per workdir: ``RUN.lock`` names the holder (host, pid, start time).

  Process 0 takes the lock; a daemon thread refreshes it every ``heartbeat_s``. A lock is
  stale (and taken over, with a warning) when its pid no longer runs on this host, or when
  it was last refreshed more than ``stale_after_s`` ago (a holder on another host). On a
  local filesystem the lock is created atomically (``O_EXCL``); on object stores, which
  have no exclusive create, it is written and read back, which narrows but cannot close
  the race between two runs started in the same instant.
  """

  def __init__(self, workdir, heartbeat_s=30.0, stale_after_s=300.0):
    self.file = path(workdir) / LOCK_FILE
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.holder = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _now()}
    self._stop = threading.Event()
    self._thread = None

  def acquire(self):
    if not is_primary():
      return self
    self.file.parent.mkdir(parents=True, exist_ok=True)
    if not self._create():
      other = self._read()
      if other is not None and not self._is_stale(other):
        raise RuntimeError(
            f'{self.file.parent} is in use by another run (host {other.get("host")}, pid '
            f'{other.get("pid")}, started {other.get("started")}). Wait for it to finish, '
            f'stop it, or use another --workdir.')
      logging.warning('Taking over the stale lock %s (holder: %s).', self.file, other)
      self.file.unlink(missing_ok=True)
      if not self._create():
        raise RuntimeError(f'Could not take the lock {self.file}: another run took it first.')
    self._thread = threading.Thread(target=self._heartbeat, daemon=True)
    self._thread.start()
    return self

  def release(self):
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if self._read() == self.holder:
      self.file.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def _create(self) -> bool:
    text = json.dumps(self.holder)
    if '://' not in os.fspath(self.file):
      try:
        fd = os.open(os.fspath(self.file), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        return False
      with os.fdopen(fd, 'w') as f:
        f.write(text)
      return True
    if self.file.exists():
      return False
    self.file.write_text(text)
    return self._read() == self.holder

  def _read(self):
    try:
      return json.loads(self.file.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _is_stale(self, other) -> bool:
    if other.get('host') == self.holder['host']:
      return not _pid_alive(other.get('pid'))
    try:
      age = time.time() - self.file.stat().mtime
    except FileNotFoundError:
      return True
    return age > self.stale_after_s

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      if self._read() == self.holder:
        self.file.write_text(json.dumps(self.holder))


def _pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
