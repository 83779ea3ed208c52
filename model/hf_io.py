"""Hugging Face Llama / SmolLM checkpoints <-> our Llama parameters.

``import_hf_checkpoint(dir)`` reads ``config.json`` and ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``) into a ModelConfig and a float32
parameter tree; ``export_hf_checkpoint(cfg, params, dir)`` writes a directory that
``transformers.LlamaForCausalLM.from_pretrained`` loads. Weight mapping (HF Linear
weights are [out, in]):

  model.embed_tokens.weight [V, E]          <-> embedder/embed/embedding [V, E]
  lm_head.weight [V, E] (untied only)       <-> embedder/lm_head/kernel [E, V]
  model.norm.weight                         <-> final_norm/scale
  layers.i.self_attn.q_proj.weight [H*D, E] <-> layers_i/attn/q/kernel [E, H, D]  (k, v: Hkv)
  layers.i.self_attn.o_proj.weight [E, H*D] <-> layers_i/attn/o/kernel [H, D, E]
  layers.i.mlp.{gate,up}_proj.weight [F, E] <-> layers_i/mlp/{gate,up}/kernel [E, F]
  layers.i.mlp.down_proj.weight [E, F]      <-> layers_i/mlp/down/kernel [F, E]
  layers.i.input_layernorm.weight           <-> layers_i/attn_norm/scale
  layers.i.post_attention_layernorm.weight  <-> layers_i/mlp_norm/scale

(``layers.i`` is ``model.layers.i``.) With ``scan_layers`` the ``layers_i`` subtrees are
stacked under ``layers`` (see ``model.param_layout``).
"""
import json
import math
import os

import flax.linen as nn
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from model.layers import ModelConfig
from model.param_layout import stack_layers, unstack_layers

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
INDEX_NAME = 'model.safetensors.index.json'
_IGNORED_TENSOR_SUFFIXES = ('rotary_emb.inv_freq',)  # Saved by old transformers versions.


def _rope(hf):
  """(rope_type, rope_theta) from either the v4 (rope_theta, rope_scaling) or v5
  (rope_parameters) config layout."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  rope_type = params.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
  theta = hf.get('rope_theta') or params.get('rope_theta') or 10000.0
  return rope_type or 'default', float(theta)


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face Llama ``config.json`` dict; ``overrides`` set our own
  fields (``scan_layers``, ``dtype``, ...). Unsupported features raise ValueError."""
  hf = dict(hf_config)
  if hf.get('model_type') != 'llama':
    raise ValueError(f"HF config model_type={hf.get('model_type')!r}; only 'llama' "
                     '(Llama, SmolLM and other LlamaForCausalLM checkpoints) is supported.')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f"HF config hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
  for flag in ('attention_bias', 'mlp_bias'):
    if hf.get(flag):
      raise ValueError(f'HF config {flag}=True; biases are not supported.')
  rope_type, rope_theta = _rope(hf)
  if rope_type != 'default':
    raise ValueError(f'HF config rope scaling {rope_type!r} (rope_scaling/rope_parameters) is '
                     'not supported; only default RoPE.')
  missing = [k for k in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                         'num_attention_heads') if k not in hf]
  if missing:
    raise ValueError(f'HF config lacks required field(s) {missing}.')
  heads = hf['num_attention_heads']
  head_dim = hf.get('head_dim') or 0
  if head_dim * heads == hf['hidden_size']:
    head_dim = 0  # Our default (embed_dim // num_heads).
  fields = dict(
      name='llama', vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads') or heads, head_dim=head_dim,
      mlp_dim=hf['intermediate_size'], rope_theta=rope_theta,
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      init_std=float(hf.get('initializer_range', 0.02)))
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
  """The ``config.json`` dict of a LlamaForCausalLM equivalent to ``cfg``."""
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.dims_per_head, 'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'tie_word_embeddings': cfg.tie_embeddings, 'attention_bias': False, 'mlp_bias': False,
      'initializer_range': cfg.init_std, 'dtype': 'float32',
  }


def _tensor_specs(cfg: ModelConfig):
  """(HF name, our loop-layout path, our shape, n_in) per tensor. ``n_in`` is the number of
  leading input axes of a kernel (HF stores it transposed, flattened to [out, in]); None
  for tensors stored as they are."""
  e, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
  specs = [('model.embed_tokens.weight', ('embedder', 'embed', 'embedding'), (v, e), None),
           ('model.norm.weight', ('final_norm', 'scale'), (e,), None)]
  if not cfg.tie_embeddings:
    specs.append(('lm_head.weight', ('embedder', 'lm_head', 'kernel'), (e, v), 1))
  for i in range(cfg.num_layers):
    hf, ours = f'model.layers.{i}.', f'layers_{i}'
    specs += [
        (hf + 'self_attn.q_proj.weight', (ours, 'attn', 'q', 'kernel'), (e, h, d), 1),
        (hf + 'self_attn.k_proj.weight', (ours, 'attn', 'k', 'kernel'), (e, hkv, d), 1),
        (hf + 'self_attn.v_proj.weight', (ours, 'attn', 'v', 'kernel'), (e, hkv, d), 1),
        (hf + 'self_attn.o_proj.weight', (ours, 'attn', 'o', 'kernel'), (h, d, e), 2),
        (hf + 'mlp.gate_proj.weight', (ours, 'mlp', 'gate', 'kernel'), (e, f), 1),
        (hf + 'mlp.up_proj.weight', (ours, 'mlp', 'up', 'kernel'), (e, f), 1),
        (hf + 'mlp.down_proj.weight', (ours, 'mlp', 'down', 'kernel'), (f, e), 1),
        (hf + 'input_layernorm.weight', (ours, 'attn_norm', 'scale'), (e,), None),
        (hf + 'post_attention_layernorm.weight', (ours, 'mlp_norm', 'scale'), (e,), None),
    ]
  return specs


def _hf_shape(shape, n_in):
  return shape if n_in is None else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _weight_files(path):
  """{tensor name: safetensors file} for a checkpoint directory."""
  single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
  if os.path.exists(single):
    with safe_open(single, framework='np') as f:
      return {name: single for name in f.keys()}
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  raise FileNotFoundError(f'No {WEIGHTS_NAME} or {INDEX_NAME} in checkpoint directory {path}.')


def _read_tensors(files):
  """Loads every tensor as float32 numpy (bfloat16/float16 converted), one file at a time."""
  tensors = {}
  for file in sorted(set(files.values())):
    with safe_open(file, framework='np') as f:
      for name in f.keys():
        if files.get(name) == file:
          tensors[name] = np.asarray(f.get_tensor(name), np.float32)
  return tensors


def import_hf_checkpoint(path, scan_layers=False):
  """Reads a HF Llama checkpoint directory -> (ModelConfig, params of float32 numpy arrays).

  Missing directory/config/weights raise FileNotFoundError; unsupported configs, missing,
  unexpected or mis-shaped tensors raise ValueError naming them.
  """
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'HF checkpoint config {config_path} not found.')
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f), scan_layers=scan_layers)
  tensors = _read_tensors(_weight_files(path))
  specs = _tensor_specs(cfg)
  wanted = {name for name, *_ in specs}
  if cfg.tie_embeddings:
    wanted.add('lm_head.weight')  # Some tied checkpoints also store it; it is ignored.
  unexpected = sorted(n for n in tensors if n not in wanted
                      and not n.endswith(_IGNORED_TENSOR_SUFFIXES))
  if unexpected:
    raise ValueError(f'Unexpected tensors in {path} for a Llama model: {unexpected}.')
  params = {}
  for name, our_path, shape, n_in in specs:
    if name not in tensors:
      raise ValueError(f'Tensor {name} missing from checkpoint {path}.')
    w = tensors[name]
    if w.shape != _hf_shape(shape, n_in):
      raise ValueError(f'Tensor {name} has shape {w.shape}; config.json implies '
                       f'{_hf_shape(shape, n_in)}.')
    node = params
    for key in our_path[:-1]:
      node = node.setdefault(key, {})
    node[our_path[-1]] = w if n_in is None else np.ascontiguousarray(w.T.reshape(shape))
  if scan_layers:
    params = stack_layers(params)
  return cfg, params


def export_hf_checkpoint(cfg: ModelConfig, params, path, overwrite=False):
  """Writes ``config.json`` + ``model.safetensors`` (float32) for LlamaForCausalLM.

  ``params`` may be in loop or scanned layout (boxed or not). Refuses a non-empty ``path``
  (FileExistsError) unless ``overwrite``; then stale safetensors weights there are removed.
  """
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f'Export directory {path} is not empty; pass overwrite=True.')
  params = nn.meta.unbox(params)
  if 'layers' in params:
    params = unstack_layers(params, cfg.num_layers)
  tensors = {}
  for name, our_path, shape, n_in in _tensor_specs(cfg):
    node = params
    for key in our_path:
      if key not in node:
        raise ValueError(f"Parameter {'/'.join(our_path)} (for {name}) missing from params.")
      node = node[key]
    w = np.asarray(node, np.float32)
    if w.shape != shape:
      raise ValueError(f"Parameter {'/'.join(our_path)} has shape {w.shape}; cfg implies {shape}.")
    tensors[name] = np.ascontiguousarray(
        w if n_in is None else w.reshape(_hf_shape(shape, n_in)[::-1]).T)
  os.makedirs(path, exist_ok=True)
  for file in os.listdir(path):
    if file == INDEX_NAME or file.endswith('.safetensors'):
      os.remove(os.path.join(path, file))
  save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={'format': 'pt'})
  with open(os.path.join(path, CONFIG_NAME), 'w') as f:
    json.dump(config_to_hf(cfg), f, indent=2)
