"""The batch and memory plan (training.budget, Trainer.compile): the global batch holds on
any device count, a step that does not fit stops before step 1 with one message, the auto
micro-batch is the largest that fits, and the logged MFU is the analytic FLOPs' share."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl.testing import absltest

from model.config_errors import ConfigError
from tests.test_train import REPO, _random_batch
from tests.utils import assert_update_close, mean_loss_tol, tiny_config
from training import budget, sharding, trainer


def _config(**train_overrides):
  config = tiny_config(num_layers=1)
  config.train.update({'grad_accum': 0, 'micro_batch_per_device': 0, **train_overrides})
  return config


def _trainer(config, devices, workdir='unused'):
  config.mesh.update(dict(data=devices, fsdp=1, tensor=1))
  return trainer.Trainer(config, workdir,
                         mesh=sharding.make_mesh(config.mesh, jax.devices()[:devices]))


class BatchPlanTest(absltest.TestCase):

  def test_bad_combinations_name_the_fields(self):
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
    for overrides, fields in [
        (dict(grad_accum=2, micro_batch_per_device=2), 'grad_accum=2 x config.train.micro'),
        (dict(micro_batch_per_device=3),
         'batch_size=16 over 8 batch shards .*config.train.micro_batch_per_device=3'),
        (dict(grad_accum=4), 'batch_size=16 over 8 batch shards .*config.train.grad_accum=4')]:
      config = _config(**overrides)
      config.data.batch_size = 16
      with self.assertRaisesRegex(ConfigError, fields):
        budget.plan_batch(config, mesh)

  def test_same_global_batch_and_first_step_on_1_2_8_devices(self):
    """One micro-batch of 1 sequence per device: 8, 4 and 1 accumulation steps keep the
    global batch of 8. The loss is a mean over the same B x T tokens summed in another order
    (``mean_loss_tol``: K eps relative, K = B T); the update agrees to ``UPDATE_RTOL`` of its
    size (tests/utils.py says why)."""
    config = _config(micro_batch_per_device=1)
    batch = _random_batch(config)
    results = {}
    for devices in (1, 2, 8):
      t = _trainer(config.copy_and_resolve_references(), devices)
      report = t.compile(batch)
      self.assertEqual((t.batch_plan.global_batch, report['accum']), (8, 8 // devices))
      with t.context():
        state = t._init(jax.random.PRNGKey(0))
        before = jax.device_get(state['params'])
        state, metrics = t.compiled_step(state, sharding.shard_batch(batch, t.mesh), None)
      results[devices] = jax.device_get(state['params']), float(metrics['train/loss'])
    for devices in (2, 8):
      self.assertAlmostEqual(results[devices][1], results[1][1],
                             delta=mean_loss_tol(config, results[1][1]))
      assert_update_close(results[devices][0], results[1][0], before)


class MemoryPlanTest(absltest.TestCase):

  def test_step_over_the_limit_stops_before_step_one_with_one_line(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    proc = subprocess.run(
        [sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
         f'--workdir={workdir}', '--config.model.num_layers=1', '--config.model.embed_dim=32',
         '--config.model.mlp_dim=64', '--config.data.seq_len=32', '--config.data.max_docs=40',
         '--config.train.micro_batch_per_device=2', '--config.train.grad_accum=0',
         '--config.train.memory_limit_bytes=1000'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    self.assertNotIn('Traceback', proc.stderr)
    last = proc.stderr.strip().splitlines()[-1]
    self.assertRegex(last, r'^Error: The train step does not fit in device memory: global '
                           r'batch 16 .* 1 micro-batch\(es\) of 2 per device needs .* per '
                           r'device .* but the limit is 0.0 MiB \(config.train.memory_limit'
                           r'_bytes\)')
    for knob in ('config.train.micro_batch_per_device (now 2', 'config.model.remat (now False',
                 "config.model.remat_policy (now 'full'", "config.model.attention_impl (now "
                 "'xla'"):
      self.assertIn(knob, last)
    # Nothing ran: no checkpoint, no metrics, no recorded config.
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))
    self.assertFalse(os.path.exists(os.path.join(workdir, 'metrics.jsonl')))

  def test_auto_micro_batch_is_the_largest_that_fits(self):
    config = _config(memory_limit_bytes=1e12)  # batch 8 on 2 devices: 4 per device
    batch = _random_batch(config)
    t = _trainer(config.copy_and_resolve_references(), 2)
    self.assertEqual(t.compile(batch)['micro_batch_per_device'], 4)
    estimates = t.memory_report['estimates']
    self.assertEqual(sorted(estimates), [1, 2, 4])
    self.assertLess(estimates[1], estimates[4])
    config.train.memory_limit_bytes = (estimates[2] + estimates[4]) / 2
    self.assertEqual(_trainer(config.copy_and_resolve_references(), 2).compile(batch)[
        'micro_batch_per_device'], 2)
    config.train.memory_limit_bytes = estimates[1] / 2
    with self.assertRaisesRegex(ConfigError, r'even the smallest micro-batch \(1 per device\)'):
      _trainer(config.copy_and_resolve_references(), 2).compile(batch)

  def test_fit_reuses_the_planned_step_and_logs_mfu(self):
    config = _config(micro_batch_per_device=1, peak_flops_per_device=1e9, steps=1)
    workdir = self.create_tempdir().full_path
    with _trainer(config, 8, workdir) as t:
      state = t.restore_or_init()
      t.fit(state, iter([_random_batch(config)]), until=1)
      self.assertEqual(t.step_fn._cache_size(), 0)  # the jit never compiled again
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      record = json.loads(f.readline())
    _, non_emb = trainer.count_params(t.abstract['params'])
    self.assertEqual(t.flops_per_token, budget.analytic_flops_per_token(t.model.cfg, non_emb, 32))
    np.testing.assert_allclose(
        record['train/mfu'], t.flops_per_token * record['train/tokens_per_s'] / (1e9 * 8),
        rtol=1e-6)


if __name__ == '__main__':
  absltest.main()
