"""Remat policies (``model.remat``, ``model.remat_policy``): the same gradients under every
policy in the llama and recursive families; ``full`` keeps less for the backward pass than no
remat (XLA's memory analysis of the compiled gradient)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from model import layers
from model.llama import Llama
from model.recursive import Recursive, RecursiveConfig
from tests.utils import FORWARD_RTOL, assert_close

SHAPES = dict(vocab_size=64, embed_dim=32, num_layers=4, num_heads=4, num_kv_heads=2,
              mlp_dim=64)


def _grad_fn(model):
  def loss(params, tokens):
    logits, _ = model.apply({'params': params}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  return jax.jit(jax.grad(loss))


class RematTest(parameterized.TestCase):

  @parameterized.parameters(
      (Llama, layers.ModelConfig(**SHAPES, scan_layers=True), tuple(layers.REMAT_POLICIES)),
      (Recursive, RecursiveConfig(**SHAPES, num_loops=2, lora_rank=2, scan_layers=True),
       ('dots_no_batch',)))
  def test_policies_give_the_same_gradients(self, family, cfg, policies):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
    params = family(cfg).init(jax.random.PRNGKey(0), tokens)['params']
    flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    reference = flat(_grad_fn(family(cfg))(params, tokens))
    for policy in policies:
      remat_cfg = dataclasses.replace(cfg, remat=True, remat_policy=policy)
      assert_close(flat(_grad_fn(family(remat_cfg))(params, tokens)), reference, FORWARD_RTOL)

  def test_full_remat_keeps_less(self):
    cfg = layers.ModelConfig(**{**SHAPES, 'embed_dim': 64, 'mlp_dim': 256}, scan_layers=True)
    tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32)
    params = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros(
        (1, 8), jnp.int32))['params'])

    def temporaries(c):
      return _grad_fn(Llama(c)).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    self.assertLess(temporaries(dataclasses.replace(cfg, remat=True, remat_policy='full')),
                    0.7 * temporaries(cfg))

  def test_unknown_policy_raises(self):
    with self.assertRaisesRegex(ValueError, 'model.remat_policy'):
      layers.ModelConfig(remat=True, remat_policy='some')


if __name__ == '__main__':
  absltest.main()
