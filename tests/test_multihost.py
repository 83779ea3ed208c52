"""Two JAX processes on this machine as one 4-device mesh: SIGTERM, per-process resume.

Each process is ``python -m launch.main ... --config.distributed=True`` with a local
coordinator and CPU collectives (gloo), two fake CPU devices each. One process gets
SIGTERM; JAX's preemption sync point stops both after the same step; they save and exit 0.
The resumed run restores each process's own data-iterator position (the two differ) and
ends with the parameters of an uninterrupted two-process run.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from absl.testing import absltest

from tests.utils import tiny_config
from training import checkpoint as ckpt_lib
from training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
OVERRIDES = ['--config.model.embed_dim=32', '--config.model.num_layers=2',
             '--config.model.mlp_dim=64', '--config.data.seq_len=32',
             '--config.data.batch_size=8', '--config.data.shuffle_buffer=0',
             f'--config.train.steps={STEPS}',
             '--config.train.checkpoint_every=4', '--config.train.keep_checkpoints=2',
             '--config.train.async_checkpointing=False', '--config.train.eval_every=0',
             '--config.train.log_every=1', '--config.train.tensorboard=False',
             '--config.train.report_unigram_entropy=False', '--config.sample.max_new_tokens=0']


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _write_corpus(directory):
  """JSONL train and validation files. Process 0 reads the even lines (short documents),
  process 1 the odd ones (long), so their iterator positions differ from the first step.

  Rows are not shuffled: a shuffle window's state is the same on both processes until
  the window is refilled, which made the positions equal when SIGTERM came early.
  """
  for name, count in (('train', 200), ('validation', 4)):
    with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
      for i in range(count):
        text = f'doc {i} ' + ('short. ' if i % 2 == 0 else 'a much longer document. ' * 8)
        f.write(json.dumps({'text': text}) + '\n')
  return ['--config.data.source=jsonl', f'--config.data.paths={directory}/train.jsonl',
          f'--config.data.validation_paths={directory}/validation.jsonl']


def _launch(workdir, data_flags):
  """Starts the two processes of one run; returns their Popen objects."""
  # Two devices per process, and the test process's compile-time options (conftest.py).
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             ' --xla_force_host_platform_device_count=2')
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
       f'--workdir={workdir}', '--config.distributed=True',
       f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}',
       *OVERRIDES, *data_flags], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs, test):
  for i, proc in enumerate(procs):
    _, stderr = proc.communicate(timeout=600)
    test.assertEqual(proc.returncode, 0, f'process {i}:\n{stderr[-3000:]}')


def _final_params(workdir):
  """The latest checkpoint's parameters, restored in this (single) test process."""
  config = tiny_config()
  mesh = jax.make_mesh((1, 1, 1), ('data', 'fsdp', 'tensor'), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  *_, abstract, _, _, _ = trainer.build_state_fns(config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
  step = checkpointer.latest_step()
  state, _ = checkpointer.restore(step, abstract)
  checkpointer.close()
  return step, jax.device_get(state['params'])


class MultiHostTest(absltest.TestCase):

  def test_sigterm_and_resume_with_two_processes(self):
    data_flags = _write_corpus(self.create_tempdir().full_path)
    straight = self.create_tempdir().full_path
    _finish(_launch(straight, data_flags), self)

    resumed = self.create_tempdir().full_path
    procs = _launch(resumed, data_flags)
    metrics = os.path.join(resumed, 'metrics.jsonl')
    deadline = time.time() + 300
    while time.time() < deadline and procs[0].poll() is None:
      if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
        break
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # One process is told; both must stop.
    _finish(procs, self)
    with open(os.path.join(resumed, 'summary.json')) as f:
      summary = json.load(f)
    stopped = summary['step']
    self.assertTrue(summary['preempted'])
    self.assertLess(stopped, STEPS)
    data_dir = os.path.join(resumed, 'checkpoints', str(stopped), 'data')
    positions = [open(os.path.join(data_dir, f'process_{i}-of-2.json')).read()
                 for i in range(2)]
    self.assertNotEqual(positions[0], positions[1])

    _finish(_launch(resumed, data_flags), self)
    step_a, params_a = _final_params(straight)
    step_b, params_b = _final_params(resumed)
    self.assertEqual((step_a, step_b), (STEPS, STEPS))
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


if __name__ == '__main__':
  absltest.main()
