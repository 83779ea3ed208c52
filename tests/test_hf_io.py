"""Hugging Face Llama interop: logits parity with transformers, round trips, errors."""
import json
import os

from absl.testing import absltest, parameterized
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file
import torch
import transformers

from model import decode, hf_io, param_layout
from model.llama import Llama
from tests.utils import FORWARD_RTOL, assert_close

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 11))


def _hf_model(seed=0, dtype=torch.float32, **overrides):
  """A tiny random LlamaForCausalLM; norm scales randomised too so that swaps show."""
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                initializer_range=0.1, eos_token_id=None, bos_token_id=None)
  kwargs.update(overrides)
  model = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(**kwargs, attn_implementation='eager')).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model.to(dtype)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _our_logits(cfg, params, tokens):
  return np.asarray(Llama(cfg).apply({'params': params}, jnp.asarray(tokens))[0])


class HfIoTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def _save(self, model, name='hf', **kwargs):
    path = os.path.join(self.dir, name)
    model.save_pretrained(path, **kwargs)
    return path

  @parameterized.named_parameters(
      ('gqa_untied_scan', dict(num_key_value_heads=2, rope_theta=500.0), True),
      ('mha_tied_loop', dict(num_key_value_heads=4, tie_word_embeddings=True), False),
      ('gqa_tied_3layers_loop',
       dict(num_hidden_layers=3, tie_word_embeddings=True, rope_theta=50_000.0), False),
  )
  def test_import_matches_transformers_logits(self, overrides, scan_layers):
    hf_model = _hf_model(**overrides)
    cfg, params = hf_io.import_hf_checkpoint(self._save(hf_model), scan_layers=scan_layers)
    self.assertEqual(cfg.scan_layers, scan_layers)
    self.assertEqual(cfg.tie_embeddings, overrides.get('tie_word_embeddings', False))
    self.assertEqual(cfg.rope_theta, overrides.get('rope_theta', 10000.0))
    assert_close(_our_logits(cfg, params, TOKENS), _hf_logits(hf_model, TOKENS), FORWARD_RTOL)

  @parameterized.named_parameters(('untied_scan', False, True), ('tied_loop', True, False))
  def test_export_round_trip_and_transformers_load(self, tied, scan_layers):
    hf_model = _hf_model(seed=1, tie_word_embeddings=tied, rope_theta=2000.0)
    cfg, params = hf_io.import_hf_checkpoint(self._save(hf_model), scan_layers=scan_layers)
    out = os.path.join(self.dir, 'export')
    hf_io.export_hf_checkpoint(cfg, params, out)
    cfg2, params2 = hf_io.import_hf_checkpoint(out, scan_layers=scan_layers)
    self.assertEqual(cfg2, cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation='eager')
    self.assertEqual(reloaded.config.rope_parameters['rope_theta'], 2000.0)
    assert_close(_hf_logits(reloaded.eval(), TOKENS), _hf_logits(hf_model, TOKENS), FORWARD_RTOL)

  def test_scan_and_loop_layouts_convert(self):
    path = self._save(_hf_model())
    _, loop = hf_io.import_hf_checkpoint(path)
    _, scan = hf_io.import_hf_checkpoint(path, scan_layers=True)
    self.assertEqual(scan['layers']['attn']['q']['kernel'].shape, (2, 64, 4, 16))
    jax.tree.map(np.testing.assert_array_equal, param_layout.stack_layers(loop), scan)
    jax.tree.map(np.testing.assert_array_equal, param_layout.unstack_layers(scan, 2), loop)
    with self.assertRaisesRegex(ValueError, 'num_layers=3'):
      param_layout.unstack_layers(scan, 3)
    del loop['layers_0']
    with self.assertRaisesRegex(ValueError, 'indices must be 0..0'):
      param_layout.stack_layers(loop)

  def test_sharded_and_bfloat16_checkpoints(self):
    hf_model = _hf_model(dtype=torch.bfloat16)
    path = self._save(hf_model, max_shard_size='40KB')
    self.assertTrue(os.path.exists(os.path.join(path, hf_io.INDEX_NAME)))
    cfg, params = hf_io.import_hf_checkpoint(path)
    self.assertEqual(params['layers_1']['mlp']['down']['kernel'].dtype, np.float32)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation='eager').eval()
    assert_close(_our_logits(cfg, params, TOKENS), _hf_logits(reloaded, TOKENS), FORWARD_RTOL)

  def test_greedy_generation_matches_transformers(self):
    hf_model = _hf_model(seed=2, initializer_range=0.3)
    cfg, params = hf_io.import_hf_checkpoint(self._save(hf_model))
    prompt = TOKENS[:1, :5]
    with torch.no_grad():
      expected = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)[0, 5:].numpy()
    out = decode.generate(Llama(cfg), params, jnp.asarray(prompt), 8,
                          decode.SamplingConfig(greedy=True), jax.random.key(0))
    np.testing.assert_array_equal(out.tokens[0], expected)

  @parameterized.named_parameters(
      ('rope_scaling', dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'linear'),
      ('rope_parameters', dict(rope_parameters={'rope_type': 'llama3', 'rope_theta': 1.0}),
       'llama3'),
      ('attention_bias', dict(attention_bias=True), 'attention_bias'),
      ('mlp_bias', dict(mlp_bias=True), 'mlp_bias'),
      ('hidden_act', dict(hidden_act='gelu'), 'gelu'),
      ('model_type', dict(model_type='mistral'), 'mistral'),
      ('missing_field', dict(hidden_size=None), 'hidden_size'),
  )
  def test_unsupported_config_raises(self, change, message):
    hf = {'model_type': 'llama', 'vocab_size': 96, 'hidden_size': 64, 'intermediate_size': 96,
          'num_hidden_layers': 2, 'num_attention_heads': 4}
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with self.assertRaisesRegex(ValueError, message):
      hf_io.config_from_hf(hf)

  def test_bad_checkpoints_raise(self):
    path = self._save(_hf_model())
    weights = os.path.join(path, hf_io.WEIGHTS_NAME)
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if 'layers.1.mlp.up_proj' not in k}, weights)
    with self.assertRaisesRegex(ValueError, r'model\.layers\.1\.mlp\.up_proj\.weight missing'):
      hf_io.import_hf_checkpoint(path)
    save_file(tensors, weights)
    config_path = os.path.join(path, hf_io.CONFIG_NAME)
    with open(config_path) as f:
      config = json.load(f)
    with open(config_path, 'w') as f:
      json.dump(dict(config, intermediate_size=128), f)
    with self.assertRaisesRegex(ValueError, r'model\.layers\.0\.mlp\.gate_proj\.weight has shape'):
      hf_io.import_hf_checkpoint(path)
    missing = os.path.join(self.dir, 'nowhere')
    with self.assertRaisesRegex(FileNotFoundError, 'nowhere'):
      hf_io.import_hf_checkpoint(missing)
    os.remove(weights)
    with self.assertRaisesRegex(FileNotFoundError, 'model.safetensors'):
      hf_io.import_hf_checkpoint(path)

  def test_export_refuses_non_empty_directory(self):
    cfg, params = hf_io.import_hf_checkpoint(self._save(_hf_model()))
    out = os.path.join(self.dir, 'export')
    os.makedirs(out)
    with open(os.path.join(out, 'notes.txt'), 'w') as f:
      f.write('keep me')
    with self.assertRaisesRegex(FileExistsError, 'not empty'):
      hf_io.export_hf_checkpoint(cfg, params, out)
    self.assertEqual(os.listdir(out), ['notes.txt'])
    hf_io.export_hf_checkpoint(cfg, params, out, overwrite=True)
    self.assertEqual(hf_io.import_hf_checkpoint(out)[0], cfg)


if __name__ == '__main__':
  absltest.main()
