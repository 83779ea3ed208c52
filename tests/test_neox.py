"""GPT-NeoX layers (layer_style='gpt_neox'): parity with transformers' GPTNeoXLayer and
GPTNeoXForCausalLM (import and export), cached decoding, config errors, Pythia and Block
Transformer paper configs."""
import contextlib
import io
import os

from absl.testing import absltest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers
from transformers.models.gpt_neox import modeling_gpt_neox

from configs import block_paper, pythia
from model import block_conversion, decode, hf_io
from model.block_transformer import BlockTransformer
from model.layers import DecoderBlock, ModelConfig, decoder_block_params
from model.llama import Llama
from model.mor import MoRConfig
from model.recursive import RecursiveConfig
from model.registry import build_model
from tests.utils import FORWARD_RTOL, assert_close
from training import train

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 11))


def _hf_config(**overrides):
  kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, rotary_pct=0.25, rotary_emb_base=500,
                layer_norm_eps=1e-5, initializer_range=0.1, bos_token_id=None,
                eos_token_id=None)
  kwargs.update(overrides)
  return transformers.GPTNeoXConfig(**kwargs, attn_implementation='eager')


def _randomise(module, seed):
  """Random weights everywhere, biases and LayerNorms included, so that swaps show."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      scale = 0.2 if name.endswith('bias') or 'layernorm' in name or 'layer_norm' in name else 0.1
      p.copy_((1.0 if 'norm.weight' in name else 0.0) + scale * torch.randn_like(p))
  return module.eval()


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


class NeoXLayerTest(absltest.TestCase):

  def test_layer_matches_transformers(self):
    hf_cfg = _hf_config(hidden_size=32, intermediate_size=48, rotary_pct=0.5)
    layer = _randomise(modeling_gpt_neox.GPTNeoXLayer(hf_cfg, 0), seed=0)
    sd = {k: v.numpy() for k, v in layer.state_dict().items()}
    h, d = 4, 8
    qkv_w = sd['attention.query_key_value.weight'].T.reshape(32, h, 3, d)
    qkv_b = sd['attention.query_key_value.bias'].reshape(h, 3, d)
    lin = lambda w, b, shape: {'kernel': w.T.reshape(shape), 'bias': b}
    params = {
        'attn': {'o': lin(sd['attention.dense.weight'], sd['attention.dense.bias'], (h, d, 32)),
                 **{p: {'kernel': qkv_w[:, :, j], 'bias': qkv_b[:, j]}
                    for j, p in enumerate('qkv')}},
        'mlp': {'up': lin(sd['mlp.dense_h_to_4h.weight'], sd['mlp.dense_h_to_4h.bias'], (32, 48)),
                'down': lin(sd['mlp.dense_4h_to_h.weight'], sd['mlp.dense_4h_to_h.bias'],
                            (48, 32))},
        'attn_norm': {'scale': sd['input_layernorm.weight'], 'bias': sd['input_layernorm.bias']},
        'mlp_norm': {'scale': sd['post_attention_layernorm.weight'],
                     'bias': sd['post_attention_layernorm.bias']},
    }
    cfg = ModelConfig(embed_dim=32, num_heads=h, num_kv_heads=h, mlp_dim=48, rope_theta=500.0,
                      layer_style='gpt_neox', rotary_pct=0.5)
    self.assertEqual(sum(w.size for w in jax.tree.leaves(params)), decoder_block_params(cfg))
    b, t = 2, 7
    x = np.random.default_rng(1).normal(size=(b, t, 32)).astype(np.float32)
    positions = np.arange(t)[None] + np.array([[0], [5]])  # the second row continues a prefix
    ours, kv = DecoderBlock(cfg).apply({'params': params}, jnp.asarray(x), None,
                                       (jnp.asarray(positions), None, None))
    self.assertIsNone(kv)
    pos_t = torch.as_tensor(positions)
    cos_sin = modeling_gpt_neox.GPTNeoXRotaryEmbedding(hf_cfg)(torch.as_tensor(x), pos_t)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
      out = layer(torch.as_tensor(x), attention_mask=mask, position_ids=pos_t,
                  position_embeddings=cos_sin)
    theirs = (out[0] if isinstance(out, tuple) else out).numpy()
    self.assertLessEqual(np.max(np.abs(np.asarray(ours) - theirs)), 1e-5)

  def test_cached_decoding_equals_forward(self):
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp_dim=64, layer_style='gpt_neox', rotary_pct=0.5, scan_layers=True,
                      init_std=0.3)
    model = Llama(cfg)
    prompts = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 5)), jnp.int32)
    lengths = np.array([5, 3])
    params = jax.jit(model.init)(jax.random.key(0), prompts)['params']
    n = 6
    out = decode.generate(model, params, prompts, n, decode.SamplingConfig(greedy=True),
                          jax.random.key(1), prompt_lengths=jnp.asarray(lengths))
    # Teacher-forced forward over prompt + generated tokens (right-padded rows).
    full = np.zeros((2, 5 + n), np.int32)
    seg = np.zeros((2, 5 + n), np.int32)
    for r, length in enumerate(lengths):
      full[r, :length], full[r, length:length + n] = prompts[r, :length], out.tokens[r]
      seg[r, :length + n] = 1
    logits = jax.jit(model.apply)({'params': params}, jnp.asarray(full),
                                  segment_ids=jnp.asarray(seg))[0]
    logp = np.asarray(jax.nn.log_softmax(logits))
    for r, length in enumerate(lengths):
      steps = logp[r, length - 1:length - 1 + n]
      np.testing.assert_array_equal(out.tokens[r], steps.argmax(-1))
      assert_close(out.policy_logprobs[r], steps.max(-1), FORWARD_RTOL)

  def test_bad_configs_raise_naming_the_field(self):
    for overrides, field in [(dict(layer_style='gpt-neox'), 'model.layer_style'),
                             (dict(rotary_pct=0.0), 'model.rotary_pct'),
                             (dict(rotary_pct=1.5), 'model.rotary_pct'),
                             (dict(rotary_pct=0.1), 'model.rotary_pct')]:  # 6 dims x 0.1
      with self.assertRaisesRegex(ValueError, field):
        ModelConfig(embed_dim=24, num_heads=4, **overrides)
    for config_cls in (RecursiveConfig, MoRConfig):
      with self.assertRaisesRegex(ValueError, 'model.layer_style'):
        config_cls(layer_style='gpt_neox')
    block = build_model(ml_collections.ConfigDict(dict(
        name='block', embed_dim=32, num_heads=4, mlp_dim=64, layer_style='gpt_neox',
        rotary_pct=0.5)))
    self.assertEqual(block.cfg.token_config.layer_style, 'gpt_neox')


class NeoXHfIoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_import_export_match_transformers(self):
    hf_model = _randomise(transformers.GPTNeoXForCausalLM(_hf_config()), seed=3)
    path = os.path.join(self.dir, 'hf')
    hf_model.save_pretrained(path)
    cfg, params = hf_io.import_hf_checkpoint(path, scan_layers=True)
    self.assertEqual((cfg.layer_style, cfg.rotary_pct, cfg.rope_theta, cfg.tie_embeddings),
                     ('gpt_neox', 0.25, 500.0, False))
    expected = _hf_logits(hf_model, TOKENS)
    ours = Llama(cfg).apply({'params': params}, jnp.asarray(TOKENS))[0]
    assert_close(ours, expected, FORWARD_RTOL)
    out = os.path.join(self.dir, 'export')
    hf_io.export_hf_checkpoint(cfg, params, out)
    cfg2, params2 = hf_io.import_hf_checkpoint(out, scan_layers=True)
    self.assertEqual(cfg2, cfg)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(out, attn_implementation='eager')
    assert_close(_hf_logits(reloaded.eval(), TOKENS), expected, FORWARD_RTOL)
    # Uptraining a Block Transformer from the Pythia-style checkpoint: its layers as they are.
    block_cfg = block_conversion.block_config(cfg, block_len=4, block_layers=1, token_layers=1)
    block_params = block_conversion.convert_params(params, cfg, block_cfg)
    for name, source in (('block_layers', 0), ('token_layers', 1)):
      jax.tree.map(lambda got, src, i=source: np.testing.assert_array_equal(got[0], src[i]),
                   block_params[name], params['layers'])
    logits, _ = BlockTransformer(block_cfg).apply({'params': block_params},
                                                  jnp.asarray(TOKENS[:, :8]))
    self.assertTrue(np.all(np.isfinite(logits)))

  def test_tied_checkpoint_imports(self):
    hf_model = _randomise(transformers.GPTNeoXForCausalLM(
        _hf_config(tie_word_embeddings=True, rotary_pct=1.0, num_hidden_layers=1)), seed=4)
    path = os.path.join(self.dir, 'tied')
    hf_model.save_pretrained(path)
    cfg, params = hf_io.import_hf_checkpoint(path)
    self.assertEqual((cfg.tie_embeddings, cfg.rotary_pct), (True, 1.0))
    ours = Llama(cfg).apply({'params': params}, jnp.asarray(TOKENS))[0]
    assert_close(ours, _hf_logits(hf_model, TOKENS), FORWARD_RTOL)

  def test_hf_configs(self):
    hf = {'model_type': 'gpt_neox', 'vocab_size': 96, 'hidden_size': 64,
          'intermediate_size': 96, 'num_hidden_layers': 2, 'num_attention_heads': 4}
    for change, message in [(dict(use_parallel_residual=False), 'use_parallel_residual'),
                            (dict(hidden_act='gelu_new'), 'hidden_act'),
                            (dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'linear'),
                            (dict(attention_bias=False), 'attention_bias')]:
      with self.assertRaisesRegex(ValueError, message):
        hf_io.config_from_hf({**hf, **change})
    self.assertEqual(hf_io.config_from_hf(hf).rotary_pct, 0.25)  # transformers' default
    legacy = hf_io.config_from_hf({**hf, 'rotary_pct': 0.5, 'rotary_emb_base': 123})  # Pythia's
    self.assertEqual((legacy.rotary_pct, legacy.rope_theta), (0.5, 123.0))
    gqa = ModelConfig(embed_dim=32, num_heads=4, num_kv_heads=2, layer_style='gpt_neox')
    with self.assertRaisesRegex(ValueError, 'model.num_kv_heads'):
      hf_io.export_hf_checkpoint(gqa, {}, os.path.join(self.dir, 'gqa'))


class PaperConfigTest(absltest.TestCase):

  def test_configs(self):
    for size in pythia.SIZES:
      self.assertEqual(pythia.get_config(size).model.layer_style, 'gpt_neox')
    for size in block_paper.SIZES:
      config = block_paper.get_config(size)
      self.assertEqual(config.data.block_len, config.model.block_len)
    with self.assertRaisesRegex(ValueError, 'b4_5'):
      block_paper.get_config('b4_6')

  def test_smallest_dry_runs(self):
    """Compiles the train step of the smallest configs (shorter sequences, small batch) on 8
    fake devices. Pythia-70M's counts are Pythia's published ones (Biderman et al. 2023);
    b4_5's are the dry run's (configs/block_paper.py)."""
    for config, counts in [(pythia.get_config('70m'), (70426624, 18915328)),
                           (block_paper.get_config('b4_5'), (43302144, 17546496))]:
      config.data.update(seq_len=256, batch_size=8)
      config.train.grad_accum = 1
      config.dry_run = True
      with contextlib.redirect_stdout(io.StringIO()):
        report = train.train_and_evaluate(config, workdir=None)
      self.assertEqual((report['params_total'], report['params_non_embedding']), counts)

if __name__ == '__main__':
  absltest.main()
