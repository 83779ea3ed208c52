"""Shared helpers for tests: tiny configs that compile and run in seconds on a CPU, and
comparisons whose tolerances come from the size of the quantity compared."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import vanilla_tiny


def tiny_config(**model_overrides):
  """vanilla_tiny shrunk: 2 layers, d=32, GQA, seq 32, batch 8, few pycorpus documents, no
  end-of-run sample or unigram-entropy pass."""
  config = vanilla_tiny.get_config()
  model = dict(embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)
  model.update(model_overrides)
  config.model.update(model)
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.data.max_docs = 40
  config.data.shuffle_buffer = 16
  # The end-of-run extras (a 160-token sample: a decode compile; a unigram-entropy pass) are
  # off: one test turns them on and checks them (test_train.ResumeTest).
  config.train.update(dict(steps=4, warmup_steps=1, log_every=1, eval_every=0, eval_batches=2,
                           checkpoint_every=2, async_checkpointing=False, tensorboard=False,
                           report_unigram_entropy=False))
  config.sample.max_new_tokens = 0
  return config


# ------------------------------------------------------------------------------------------
# Tolerances from the size of the quantity compared (the suite runs on any x86 CPU or GPU,
# where reduction order, vector widths and meshes differ).
# ------------------------------------------------------------------------------------------

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 7.8e-3
# Two float32 computations of the same tiny-model forward pass (loop vs scan, cached vs full,
# batched vs alone, ours vs Hugging Face) differ in reduction order only. A float32 sum of K
# terms moves by up to about K eps relative to the size of its terms; the tiny test models'
# longest sums have K <= 128 (mlp_dim, sequence) and an output chains about 8 of them
# (layers x recursions, attention and MLP), hence 1024 eps relative to the output's size.
FORWARD_RTOL = 1024 * F32_EPS
# A few float32 elementwise operations (exp, sigmoid, log1p: within a few ulp on any XLA
# backend) and short sums (<= 16 terms), compared with a float64 reference: 64 eps relative
# to the size of the output.
ELEMENTWISE_RTOL = 64 * F32_EPS
# A training step's parameter update, compared between two computations of the same step
# (another mesh, gradient accumulation): rounding moves the gradient by about K eps relative
# (K = batch x sequence = 256 summed token gradients: 3e-5), which moves the Adam update a
# similar fraction of its size, except for the few entries whose gradient is near Adam's eps
# (1e-8), where the update is a steep function of the gradient. A wrong reduction or a missed
# all-reduce changes the update by O(1) of its size; 1% of the update's norm separates the two.
UPDATE_RTOL = 1e-2


def assert_close(actual, desired, rtol):
  """Elementwise `|actual - desired| <= rtol * max|desired|`: the error is measured against
  the size of the whole quantity compared, so entries near zero need no separate atol."""
  desired = np.asarray(desired, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=0,
                             atol=rtol * np.max(np.abs(desired)))


def mean_loss_tol(config, loss):
  """Tolerance on a float32 mean loss over the batch's B x T tokens: summing K positive terms
  in another order moves the sum by at most about K eps relative (K = B T)."""
  return F32_EPS * config.data.batch_size * config.data.seq_len * abs(float(loss))


def assert_update_close(after, reference, before, rtol=UPDATE_RTOL):
  """Per parameter leaf, `||after - reference|| <= rtol ||reference - before||`: two training
  runs from the same parameters `before` agree relative to the size of their update, not to
  the size of the parameters (|params| ~ 0.07 while one step moves them by ~3e-3)."""
  flat_ref, _ = jax.tree_util.tree_flatten_with_path(reference)
  for (path, ref), new, old in zip(flat_ref, jax.tree.leaves(after), jax.tree.leaves(before)):
    ref, new, old = (np.asarray(x, np.float64) for x in (ref, new, old))
    err, size = np.linalg.norm(new - ref), np.linalg.norm(ref - old)
    assert err <= rtol * size, (f'{jax.tree_util.keystr(path)}: ||difference|| {err:.3g} > '
                                f'{rtol:g} x ||update|| {size:.3g}')
