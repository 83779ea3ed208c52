"""Metrics to JSONL (one object per line) and TensorBoard, written by process 0 only.

A resumed run passes ``resume_step``: records past that step (logged after the checkpoint
it resumes from) are dropped from ``metrics.jsonl`` and TensorBoard, so every step appears
once; a run that starts from scratch (``resume_step=None``) in a workdir with records but
no checkpoint drops them all. The file goes through ``etils.epath``; on an object store, which
cannot append, it is rewritten whole at each write.
"""
import json
import os

import jax

from training import workdir as workdir_lib

METRICS_FILE = 'metrics.jsonl'


def wall_time_text(total_s, timings_s):
  """'Wall time: 12.3 min (sft 4.1, rl 8.2).': a reproduction's total and per-stage minutes."""
  stages = ', '.join(f'{k} {v / 60:.1f}' for k, v in timings_s.items())
  return f'Wall time: {total_s / 60:.1f} min ({stages}).'


class MetricWriter:
  """``write(step, {'train/loss': ...})`` appends to ``metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir, tensorboard=True, resume_step=None):
    self._active = jax.process_index() == 0
    self._file = workdir_lib.path(workdir) / METRICS_FILE
    self._append = '://' not in os.fspath(self._file)
    self._records = []
    self._tb = None
    if not self._active:
      return
    if self._file.exists():
      self._records = [r for r in _parse(self._file.read_text())
                       if resume_step is not None and r['step'] <= resume_step]
      workdir_lib.write_text(self._file, ''.join(json.dumps(r) + '\n' for r in self._records))
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      purge = None if resume_step is None else resume_step + 1
      self._tb = SummaryWriter(os.fspath(workdir_lib.path(workdir) / 'tensorboard'),
                               purge_step=purge)

  def last(self, prefix):
    """The last record holding a metric starting with ``prefix``: (step, {name: value})."""
    for record in reversed(self._records):
      found = {k: v for k, v in record.items() if k.startswith(prefix)}
      if found:
        return record['step'], found
    return None, {}

  def write(self, step, scalars):
    if not self._active:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._records.append(record)
    line = json.dumps(record) + '\n'
    if self._append:
      with self._file.open('a') as f:
        f.write(line)
    else:
      workdir_lib.write_text(self._file, ''.join(json.dumps(r) + '\n' for r in self._records))
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _parse(text):
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics(workdir):
  """All records of ``workdir/metrics.jsonl`` as a list of dicts."""
  return _parse((workdir_lib.path(workdir) / METRICS_FILE).read_text())
