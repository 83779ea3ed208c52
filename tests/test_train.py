"""Trainer: sharding equivalence, exact resume, cross-mesh restore, early clear errors."""
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from tests.utils import assert_update_close, mean_loss_tol, tiny_config
from training import checkpoint as ckpt_lib
from training import losses
from training import metrics as metrics_lib
from training import sharding, train, trainer
from training import workdir as workdir_lib

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
  """Two training steps from `init(PRNGKey(0))` on a mesh of `mesh_shape`: the parameters
  after them, the last step's metrics, the sharded state and the initial parameters."""
  config.mesh.update(dict(zip(sharding.MESH_AXES, mesh_shape)))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(mesh_shape))])
  model, tx, schedule, _, shardings, init, rules = trainer.build_state_fns(config, mesh)
  step = jax.jit(trainer.make_train_step(model, tx, schedule, config.train),
                 out_shardings=(shardings, None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = init(jax.random.PRNGKey(0))
    before = jax.device_get(state['params'])
    for _ in range(2):
      state, metrics = step(state, sharding.shard_batch(batch, mesh))
  return jax.device_get(state['params']), jax.device_get(metrics), state, before


def _params(workdir, config):
  mesh = sharding.make_mesh(config.mesh)
  _, _, _, abstract, _, _, _ = trainer.build_state_fns(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  state, _ = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  return jax.device_get(state['params']), ckpt.directory


class ShardingTest(absltest.TestCase):

  def test_2x2x2_mesh_matches_single_device(self):
    config = tiny_config(embed_dim=64, mlp_dim=128)
    batch = _random_batch(config)
    p1, m1, _, before = _one_step(config, (1, 1, 1), batch)
    p8, m8, state8, _ = _one_step(config, (2, 2, 2), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m8['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    assert_update_close(p8, p1, before)
    # Parameters really are sharded: the MLP kernel is split over 'fsdp' and 'tensor'.
    spec = state8['params']['layers_0']['mlp']['gate']['kernel'].sharding.spec
    self.assertEqual(tuple(spec), ('fsdp', 'tensor'))

  def test_grad_accumulation_matches_big_batch(self):
    config = tiny_config()
    batch = _random_batch(config, seed=1)
    p1, m1, _, before = _one_step(config, (1, 1, 1), batch)
    config.train.grad_accum = 4
    p4, m4, _, _ = _one_step(config, (1, 1, 1), batch)
    self.assertAlmostEqual(float(m1['train/loss']), float(m4['train/loss']),
                           delta=mean_loss_tol(config, m1['train/loss']))
    assert_update_close(p4, p1, before)

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
    config.train.async_checkpointing = True  # The real configs' setting.
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

    # A corrupt latest checkpoint: set aside (kept), the previous step resumes, and
    # retraining the lost steps gives the same parameters again.
    state_dir = os.path.join(resumed, 'checkpoints', '4', 'state')
    for root, _, files in os.walk(state_dir):
      for name in files:
        open(os.path.join(root, name), 'w').close()  # truncate every file
    with self.assertLogs(level='WARNING') as logs:
      train.train_and_evaluate(config, resumed)
    self.assertTrue(any('checkpoints_unreadable' in line for line in logs.output))
    self.assertTrue(os.path.isdir(os.path.join(resumed, 'checkpoints_unreadable', '4')))
    p_again, _ = _params(resumed, config)
    jax.tree.map(np.testing.assert_array_equal, p_straight, p_again)

  def test_changed_config_is_refused_then_recorded(self):
    config = tiny_config()
    config.train.update(steps=2, eval_every=2, eval_batches=1)
    workdir = self.create_tempdir().full_path
    train.train_and_evaluate(config, workdir)
    # A record logged after the last checkpoint by a run that then died.
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': 3, 'train/loss': 99.0}) + '\n')
    before = _snapshot(workdir)
    config.train.steps = 3
    config.model.rope_theta = 500.0
    config.data.seq_len = 16
    with self.assertRaisesRegex(ValueError, r'data.seq_len: 32 -> 16; model.rope_theta: '
                                r'10000.0 -> 500.0.*allow_config_change'):
      train.train_and_evaluate(config, workdir)
    self.assertEqual(before, _snapshot(workdir))
    config.data.seq_len = 32
    config.allow_config_change = True
    summary = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['model']['rope_theta'], 500.0)
    self.assertEqual(saved['resume_history'][0]['step'], 2)
    self.assertEqual(saved['resume_history'][0]['changes'],
                     {'model.rope_theta': [10000.0, 500.0]})
    records = metrics_lib.read_metrics(workdir)
    train_steps = [r['step'] for r in records if 'train/loss' in r]
    self.assertEqual(train_steps, [1, 2, 3])
    self.assertNotIn(99.0, [r['train/loss'] for r in records if 'train/loss' in r])
    self.assertEqual([r['step'] for r in records if 'eval/loss' in r], [0, 2, 3])
    self.assertEqual(summary['eval_step'], 3)

  def test_finished_run_reports_sample_and_unigram_entropy(self):
    """The end-of-run extras that tiny_config turns off (SigtermTest: a preempted run skips
    them)."""
    config = tiny_config()
    config.train.update(steps=1, report_unigram_entropy=True)
    config.sample.max_new_tokens = 4
    summary = train.train_and_evaluate(config, self.create_tempdir().full_path)
    self.assertTrue(summary['sample'].startswith(config.sample.prompt), summary['sample'])
    # The entropy of a distribution over the vocabulary lies in (0, log V].
    self.assertBetween(summary['validation_unigram_entropy'], 1e-3,
                       np.log(config.model.vocab_size))

  def test_restore_onto_different_mesh(self):
    config = tiny_config(embed_dim=64, mlp_dim=128)
    workdir = self.create_tempdir().full_path
    config.mesh.update(dict(data=8, fsdp=1, tensor=1))
    config.train.steps = 2
    train.train_and_evaluate(config, workdir)
    p8, _ = _params(workdir, config)
    config.mesh.update(dict(data=1, fsdp=4, tensor=2))
    mesh = sharding.make_mesh(config.mesh)
    _, _, _, abstract, _, _, _ = trainer.build_state_fns(config, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
    state, _ = ckpt.restore(2, abstract)
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
                 '--config.train.checkpoint_every=100000', '--config.train.eval_every=2',
                 '--config.train.eval_batches=1', '--config.train.log_every=1']
    proc = subprocess.Popen([sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
                             f'--workdir={workdir}', *overrides], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).readlines()) >= 5:
        break
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 0, stderr[-2000:])
    self.assertIn('SIGTERM', stderr)
    step = ckpt_lib.Checkpointer(workdir, async_save=False).latest_step()
    self.assertGreaterEqual(step, 3)
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    self.assertEqual(summary['step'], step)
    self.assertTrue(summary['preempted'])
    # The last evaluation and its step, not step 0's; no end-of-run sample or entropy pass.
    evals = [r for r in metrics_lib.read_metrics(workdir) if 'eval/loss' in r]
    self.assertGreaterEqual(summary['eval_step'], 2)
    self.assertEqual(summary['eval_step'], evals[-1]['step'])
    self.assertEqual(summary['eval/loss'], evals[-1]['eval/loss'])
    self.assertNotIn('sample', summary)
    self.assertNotIn('validation_unigram_entropy', summary)


def _snapshot(directory):
  return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
          for root, _, files in os.walk(directory) for f in files}


class ErrorTest(absltest.TestCase):

  def test_unknown_config_field_rejected_by_launcher(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    launch = lambda override: subprocess.run(
        [sys.executable, '-m', 'launch.main', '--config=configs/vanilla_tiny.py',
         f'--workdir={workdir}', override], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    for override, message in (('--config.train.no_such_field=3', 'config.train.no_such_field'),
                              ('--config.train.stepz=3', 'config.train.stepz (did you mean '
                               'steps')):
      proc = launch(override)
      self.assertEqual(proc.returncode, 1)
      self.assertNotIn('Traceback', proc.stderr)
      self.assertIn(f'Error: Unknown config field(s): {message}', proc.stderr)
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

  def test_validation_split_smaller_than_a_batch(self):
    directory = self.create_tempdir().full_path
    for name, count in (('train', 40), ('validation', 1)):
      with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
        f.writelines(json.dumps({'text': f'document {i}.'}) + '\n' for i in range(count))
    config = tiny_config()
    config.data.update(source='jsonl', paths=f'{directory}/train.jsonl',
                       validation_paths=f'{directory}/validation.jsonl')
    config.train.eval_every = 2
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    with self.assertRaisesRegex(ValueError, r'fewer than one evaluation batch \(8 sequences'):
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
    with self.assertRaisesRegex(ValueError, r'model.embed_dim: 32 -> 48'):
      train.train_and_evaluate(config, workdir)
    self.assertEqual(before, _snapshot(workdir))
    config.allow_config_change = True  # The shapes are still checked before restoring.
    with self.assertRaisesRegex(ValueError, r'embedder/embed/embedding: checkpoint \(259, 32\)'):
      train.train_and_evaluate(config, workdir)
    self.assertEqual(before, _snapshot(workdir))

  def test_bad_values_are_config_errors(self):
    for field, value, message in (('train.learning_rate', -1e-3, 'learning_rate must be >= 0'),
                                  ('data.seq_len', 0, 'seq_len must be positive'),
                                  ('data.batch_size', -8, 'batch_size must be positive')):
      config = tiny_config()
      section, name = field.split('.')
      config[section][name] = value
      workdir = os.path.join(self.create_tempdir().full_path, 'run')
      with self.assertRaisesRegex(workdir_lib.ConfigError, message):
        train.train_and_evaluate(config, workdir)
      self.assertFalse(os.path.exists(workdir))

  def test_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(self):
    config = tiny_config()
    config.train.steps = 1
    workdir = self.create_tempdir().full_path
    lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
    host = socket.gethostname()
    with open(lock, 'w') as f:  # This test process is alive: a live holder.
      json.dump({'host': host, 'pid': os.getpid(), 'started': 'earlier'}, f)
    with self.assertRaisesRegex(RuntimeError, f'in use by another run \\(host {host}, pid '
                                f'{os.getpid()}'):
      train.train_and_evaluate(config, workdir)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints')))
    dead = subprocess.Popen(['true'])
    dead.wait()
    with open(lock, 'w') as f:
      json.dump({'host': host, 'pid': dead.pid, 'started': 'earlier'}, f)
    with self.assertLogs(level='WARNING') as logs:
      train.train_and_evaluate(config, workdir)
    self.assertTrue(any('stale lock' in line for line in logs.output))
    self.assertFalse(os.path.exists(lock))  # Released at the end of the run.
    self.assertEqual(ckpt_lib.Checkpointer(workdir, async_save=False).latest_step(), 1)


def _batches(config, crash_after=None):
  for i in itertools.count():
    if crash_after is not None and i == crash_after:
      raise RuntimeError('the data went away')
    yield _random_batch(config, seed=i)


class TrainerCoreTest(absltest.TestCase):
  """The core with an injected iterator: non-finite steps and crashes never lose work."""

  def test_nonfinite_loss_stops_and_keeps_only_finite_checkpoints(self):
    config = tiny_config()
    config.train.update(learning_rate=1e6, steps=30, checkpoint_every=2, keep_checkpoints=1,
                        log_every=100)
    workdir = self.create_tempdir().full_path
    with trainer.Trainer(config, workdir) as t:
      state = t.restore_or_init()
      with self.assertRaisesRegex(FloatingPointError, r'Non-finite .* at step (\d+)') as cm:
        t.fit(state, _batches(config), config.train.steps)
      bad = int(re.search(r'at step (\d+)', str(cm.exception)).group(1))
      self.assertGreater(bad, 1)
      self.assertEqual(t.checkpointer.latest_step(), bad - 1)
      restored, _ = t.checkpointer.restore(bad - 1, t.abstract)
      for leaf in jax.tree.leaves(jax.device_get(restored['params'])):
        self.assertTrue(np.isfinite(leaf).all())
      self.assertEqual(int(restored['step']), bad - 1)

  def test_custom_loss_reads_step_arguments_not_constants(self):
    """A loss function with a reference policy's parameters as a step argument (the shape
    of an RL loss with a KL penalty): its value matches a direct computation, and new
    argument values reuse the compiled step."""
    config = tiny_config()

    def kl_to_reference(model, variables, batch, ctx):
      logits, _, model_state = losses.apply_model(model, variables, batch, ctx)
      ref_logits, _ = model.apply({'params': ctx.args['reference']}, batch['tokens'],
                                  positions=batch['positions'], segment_ids=batch['segment_ids'])
      logp, ref = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
      kl = jnp.sum(jnp.exp(logp) * (logp - ref), -1) * batch['loss_mask']
      return kl.sum() / ctx.n_tokens, {'kl': kl.sum() / ctx.n_tokens}, model_state

    workdir = self.create_tempdir().full_path
    with trainer.Trainer(config, workdir, loss_fn=kl_to_reference) as t:
      state = t.restore_or_init()
      params = jax.device_get(state['params'])
      other = jax.tree.map(lambda x: x * 0.5, params)
      batch = sharding.shard_batch(_random_batch(config), t.mesh)
      with t.context():
        kls = []
        for reference in (params, other):
          args = {'reference': t.shard_params(reference)}
          logits, _ = t.model.apply({'params': params}, batch['tokens'],
                                    positions=batch['positions'],
                                    segment_ids=batch['segment_ids'])
          ref_logits, _ = t.model.apply({'params': reference}, batch['tokens'],
                                        positions=batch['positions'],
                                        segment_ids=batch['segment_ids'])
          p, q = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
          mask = np.asarray(batch['loss_mask'])
          want = float(np.sum(np.sum(np.exp(p) * (p - q), -1) * mask) / mask.sum())
          state_copy = jax.tree.map(jnp.copy, state)
          _, metrics = t.step_fn(state_copy, batch, args)
          kls.append(float(metrics['train/kl']))
          self.assertAlmostEqual(kls[-1], want, delta=1e-5 * max(1.0, abs(want)))
      self.assertAlmostEqual(kls[0], 0.0, delta=1e-6)
      self.assertGreater(kls[1], 1e-3)
      self.assertEqual(t.step_fn._cache_size(), 1)  # one compile for both arguments

  def test_crash_in_the_loop_saves_the_last_completed_step(self):
    config = tiny_config()
    config.train.update(steps=10, checkpoint_every=100)
    workdir = self.create_tempdir().full_path
    with trainer.Trainer(config, workdir) as t:
      state = t.restore_or_init()
      with self.assertRaisesRegex(RuntimeError, 'the data went away'):
        t.fit(state, _batches(config, crash_after=3), config.train.steps)
      self.assertEqual(t.checkpointer.latest_step(), 3)
      # Batches that run out end the fit early, saved where it stopped.
      state, _ = t.checkpointer.restore(3, t.abstract)
      result = t.fit(state, itertools.islice(_batches(config), 2), config.train.steps)
      self.assertEqual((result.step, result.preempted), (5, False))
      self.assertEqual(t.checkpointer.latest_step(), 5)
      # Saved without a data state (these batches have none): a resume that has an iterator
      # to restore still reads it, rather than setting it aside as unreadable.
      step, _, data_state = t.checkpointer.restore_latest_readable(t.abstract, with_data=True)
      self.assertEqual((step, data_state), (5, None))


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
