"""The attention switch: ``attention_impl='pallas'`` (our kernels, interpret mode on CPU) trains
and decodes like ``'xla'`` in the llama and MoR families, on one device and on the 8-device
mesh; ``'auto'`` resolves per backend; an unknown value is rejected early."""
import jax
import numpy as np
from absl.testing import absltest, parameterized

from configs import mor_tiny
from model import attention, decode, layers
from model.registry import build_model
from tests.test_train import _one_step, _random_batch
from tests.utils import FORWARD_RTOL, assert_close, assert_update_close, tiny_config


def _config(family, impl):
  config = tiny_config(attention_impl=impl)
  config.data.seq_len = 16
  if family == 'mor':
    config.model = mor_tiny.mor_model(**{**config.model.to_dict(), 'num_layers': 4,
                                         'num_recursions': 2})
  return config


class PallasTrainingTest(parameterized.TestCase):

  @parameterized.parameters(('llama', (1, 1, 1)), ('mor', (1, 1, 1)), ('llama', (2, 2, 2)))
  def test_training_steps_match_xla(self, family, mesh_shape):
    batch = _random_batch(_config(family, 'xla'))
    ref, ref_metrics, _, before = _one_step(_config(family, 'xla'), (1, 1, 1), batch)
    got, metrics, _, _ = _one_step(_config(family, 'pallas'), mesh_shape, batch)
    assert_close(metrics['train/loss'], ref_metrics['train/loss'], FORWARD_RTOL)
    assert_update_close(got, ref, before)


class PallasDecodeTest(absltest.TestCase):

  def test_greedy_decoding_matches_xla(self):
    prompts = np.random.default_rng(0).integers(3, 259, (3, 6)).astype(np.int32)
    outs = []
    for impl in ('xla', 'pallas'):
      model = build_model(_config('llama', impl).model)
      params = model.init(jax.random.PRNGKey(0), prompts)['params']
      outs.append(decode.generate(model, params, prompts, 8, decode.SamplingConfig(greedy=True),
                                  jax.random.PRNGKey(1), prompt_lengths=np.array([6, 3, 5])))
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    assert_close(outs[1].policy_logprobs, outs[0].policy_logprobs, FORWARD_RTOL)


class SwitchTest(absltest.TestCase):

  def test_auto_and_bad_values(self):
    expected = 'pallas' if jax.default_backend() in ('gpu', 'tpu') else 'xla'
    self.assertEqual(attention.resolve('auto'), expected)
    with self.assertRaisesRegex(ValueError, 'model.attention_impl'):
      layers.ModelConfig(attention_impl='flash')


if __name__ == '__main__':
  absltest.main()
