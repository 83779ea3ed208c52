"""Trainer: sharding equivalence, exact resume, cross-mesh restore, early clear errors."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from tests.utils import assert_update_close, initial_params, mean_loss_tol, tiny_config
from training import checkpoint as ckpt_lib
from training import sharding, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_batch(config, seed=0):
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, config.model.vocab_size, (b, t + 1)).astype(np.int32)
  segment_ids = np.ones((b, t), np.int32)
  segment_ids[:, t // 2:] = 2  # two packed documents per row
  positions = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
  loss_mask = np.ones((b, t), np.int32)
  loss_mask[:, t // 2 - 1] = 0
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': positions.astype(np.int32),
          'segment_ids': segment_ids, 'loss_mask': loss_mask}


def _one_step(config, mesh_shape, batch):
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  model, tx, schedule, _, shardings, init, rules = train.build_state_fns(config, mesh)
  step = jax.jit(train.make_train_step(model, tx, schedule, config.train),
                 out_shardings=(shardings, None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = init(jax.random.PRNGKey(0))
    for _ in range(2):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
  return jax.device_get(state['params']), jax.device_get(metrics), state


def _params(workdir, config):
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, abstract, _, _, _ = train.build_state_fns(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  state = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  return jax.device_get(state['params']), ckpt.directory


class ShardingTest(absltest.TestCase):

  def test_2x2x2_mesh_matches_single_device(self):
    config = tiny_config(embed_dim=64, mlp_dim=128)
    batch = _random_batch(config)
    p1, m1, _ = _one_step(config, (1, 1, 1), batch)
    p8, m8, state8 = _one_step(config, (2, 2, 2), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m8['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    assert_update_close(p8, p1, initial_params(config))
    # Parameters really are sharded: the MLP kernel is split over 'fsdp' and 'tensor'.
    spec = state8['params']['layers_0']['mlp']['gate']['kernel'].sharding.spec
    self.assertEqual(tuple(spec), ('fsdp', 'tensor'))

  def test_grad_accumulation_matches_big_batch(self):
    config = tiny_config()
    batch = _random_batch(config, seed=1)
    p1, m1, _ = _one_step(config, (1, 1, 1), batch)
    config.train.grad_accum = 4
    p4, m4, _ = _one_step(config, (1, 1, 1), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m4['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    assert_update_close(p4, p1, initial_params(config))

  def test_uneven_dimension_is_replicated(self):
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 2}, jax.devices()[:2])
    box = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 5, 8), jnp.float32),
                                  ('embed', 'kv_heads', 'head_dim'))
    self.assertEqual(tuple(sharding.tree_shardings({'k': box}, mesh, sharding.DEFAULT_RULES)
                           ['k'].spec), (None, None, None))


class ResumeTest(absltest.TestCase):

  def test_restart_gives_identical_parameters(self):
    config = tiny_config()
    config.train.schedule = 'constant'  # The same learning rates whatever train.steps says.
    straight = self.create_tempdir().full_path
    train.train_and_evaluate(config, straight)
    resumed = self.create_tempdir().full_path
    config.train.steps = 2
    train.train_and_evaluate(config, resumed)
    config.train.steps = 4
    train.train_and_evaluate(config, resumed)
    p_straight, _ = _params(straight, config)
    p_resumed, _ = _params(resumed, config)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_resumed)

  def test_restore_onto_different_mesh(self):
    config = tiny_config(embed_dim=64, mlp_dim=128)
    workdir = self.create_tempdir().full_path
    config.mesh.update(dict(data=8, fsdp=1, tensor=1))
    config.train.steps = 2
    train.train_and_evaluate(config, workdir)
    p8, _ = _params(workdir, config)
    config.mesh.update(dict(data=1, fsdp=4, tensor=2))
    mesh = sharding.make_mesh(config.mesh)
    _, _, _, abstract, _, _, _ = train.build_state_fns(config, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    state = ckpt.restore(2, abstract)
    ckpt.close()
    kernel = state['params']['layers_0']['mlp']['up']['kernel']
    self.assertEqual(tuple(kernel.sharding.spec), ('fsdp', 'tensor'))
    jax.tree.map(np.testing.assert_array_equal, p8, jax.device_get(state['params']))


class SigtermTest(absltest.TestCase):

  def test_sigterm_saves_and_exits_cleanly(self):
    workdir = self.create_tempdir().full_path
    overrides = ['--config.model.embed_dim=32', '--config.model.num_layers=2',
                 '--config.model.mlp_dim=64', '--config.data.seq_len=32',
                 '--config.data.batch_size=8', '--config.data.max_docs=40',
                 '--config.data.shuffle_buffer=16', '--config.train.steps=100000',
                 '--config.train.checkpoint_every=100000', '--config.train.eval_every=0',
                 '--config.train.log_every=1', '--config.train.report_unigram_entropy=False']
    proc = subprocess.Popen([sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
                             f'--workdir={workdir}', *overrides], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
        break
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 0, stderr[-2000:])
    self.assertIn('SIGTERM', stderr)
    step = ckpt_lib.Checkpointer(workdir, async_save=False).latest_step()
    self.assertGreaterEqual(step, 3)
    with open(os.path.join(workdir, 'summary.json')) as f:
      self.assertEqual(json.load(f)['step'], step)


def _snapshot(directory):
  return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
          for root, _, files in os.walk(directory) for f in files}


class ErrorTest(absltest.TestCase):

  def test_unknown_config_field_rejected_by_launcher(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    proc = subprocess.run(
        [sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
         f'--workdir={workdir}', '--config.train.no_such_field=3'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn('no_such_field', proc.stderr)
    self.assertFalse(os.path.exists(workdir))

  def test_unknown_model_field(self):
    config = tiny_config()
    config.model.unlock()
    config.model.num_expertz = 3
    with self.assertRaisesRegex(ValueError, 'num_expertz'):
      train.train_and_evaluate(config, self.create_tempdir().full_path)

  def test_missing_data_path(self):
    config = tiny_config()
    config.data.source = 'text'
    config.data.paths = '/nonexistent/corpus/*.txt'
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    with self.assertRaisesRegex(FileNotFoundError, '/nonexistent/corpus'):
      train.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))

  def test_batch_that_does_not_split_over_the_mesh(self):
    config = tiny_config()
    config.data.batch_size = 4  # The default mesh puts all 8 test devices on 'data'.
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    with self.assertRaisesRegex(ValueError, 'batch_size=4 .* does not split over the 8 devices'):
      train.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))

  def test_mismatched_checkpoint_is_reported_and_kept(self):
    config = tiny_config()
    config.train.steps = 2
    workdir = self.create_tempdir().full_path
    train.train_and_evaluate(config, workdir)
    before = _snapshot(workdir)
    config.model.embed_dim = 48
    config.train.steps = 4
    with self.assertRaisesRegex(ValueError, r'embedder/embed/embedding: checkpoint \(259, 32\)'):
      train.train_and_evaluate(config, workdir)
    self.assertEqual(before, _snapshot(workdir))


class DryRunTest(absltest.TestCase):

  def test_smollm_360m_parameter_count(self):
    proc = subprocess.run(
        [sys.executable, '-m', 'launch.main', '--config=configs/smollm_360m.py',
         '--config.dry_run=True', '--config.data.batch_size=8', '--config.train.grad_accum=1'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    # SmolLM-360M: 361.82M parameters, 314.64M without the tied embedding (PAPERS.md §2).
    self.assertIn('"params_total": 361821120', proc.stdout)
    self.assertIn('"params_non_embedding": 314635200', proc.stdout)


if __name__ == '__main__':
  absltest.main()
