"""Hugging Face Llama / SmolLM and GPT-NeoX / Pythia checkpoints <-> our Llama parameters.

``import_hf_checkpoint(dir)`` reads ``config.json`` and ``model.safetensors`` (or the
shards listed in ``model.safetensors.index.json``) into a ModelConfig and a float32
parameter tree; ``export_hf_checkpoint(cfg, params, dir)`` writes a directory that
``transformers.LlamaForCausalLM`` (``layer_style='llama'``) or ``GPTNeoXForCausalLM``
(``layer_style='gpt_neox'``) loads with ``from_pretrained``. Weight mapping (HF Linear
weights are [out, in]). Llama (``model_type='llama'``):

  model.embed_tokens.weight [V, E]          <-> embedder/embed/embedding [V, E]
  lm_head.weight [V, E] (untied only)       <-> embedder/lm_head/kernel [E, V]
  model.norm.weight                         <-> final_norm/scale
  layers.i.self_attn.q_proj.weight [H*D, E] <-> layers_i/attn/q/kernel [E, H, D]  (k, v: Hkv)
  layers.i.self_attn.o_proj.weight [E, H*D] <-> layers_i/attn/o/kernel [H, D, E]
  layers.i.mlp.{gate,up}_proj.weight [F, E] <-> layers_i/mlp/{gate,up}/kernel [E, F]
  layers.i.mlp.down_proj.weight [E, F]      <-> layers_i/mlp/down/kernel [F, E]
  layers.i.input_layernorm.weight           <-> layers_i/attn_norm/scale
  layers.i.post_attention_layernorm.weight  <-> layers_i/mlp_norm/scale

(``layers.i`` is ``model.layers.i``.) GPT-NeoX (``model_type='gpt_neox'``: Pythia; parallel
residual, LayerNorms with bias, biased projections, partial rotary):

  gpt_neox.embed_in.weight [V, E]                  <-> embedder/embed/embedding [V, E]
  embed_out.weight [V, E] (untied only; transformers 5 also reads it as lm_head.weight)
                                                   <-> embedder/lm_head/kernel [E, V]
  gpt_neox.final_layer_norm.{weight,bias}          <-> final_norm/{scale,bias}
  layers.i.attention.query_key_value.weight [H*3*D, E]
                                                   <-> layers_i/attn/{q,k,v}/kernel [E, H, D]
  layers.i.attention.query_key_value.bias [H*3*D]  <-> layers_i/attn/{q,k,v}/bias [H, D]
  layers.i.attention.dense.{weight [E, H*D], bias} <-> layers_i/attn/o/{kernel [H, D, E], bias}
  layers.i.mlp.dense_h_to_4h.{weight [F, E], bias} <-> layers_i/mlp/up/{kernel [E, F], bias}
  layers.i.mlp.dense_4h_to_h.{weight [E, F], bias} <-> layers_i/mlp/down/{kernel [F, E], bias}
  layers.i.input_layernorm.{weight,bias}           <-> layers_i/attn_norm/{scale,bias}
  layers.i.post_attention_layernorm.{weight,bias}  <-> layers_i/mlp_norm/{scale,bias}

(``layers.i`` is ``gpt_neox.layers.i``.) The fused projection's output index is
``(h * 3 + j) * D + d`` for head h, j = 0, 1, 2 for q, k, v (transformers views it as
[..., H, 3 * D] and splits the last axis in three). With ``scan_layers`` the ``layers_i``
subtrees are stacked under ``layers`` (see ``model.param_layout``).
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
# Saved by old transformers versions (rotary frequencies; GPT-NeoX's causal-mask buffers).
_IGNORED_TENSOR_SUFFIXES = ('rotary_emb.inv_freq', '.attention.bias', '.attention.masked_bias')
_REQUIRED = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
             'num_attention_heads')


def _rope(hf):
  """(rope_type, rope_theta, partial_rotary_factor or None) from the v4 (rope_theta or
  GPT-NeoX's rotary_emb_base / rotary_pct, rope_scaling) or v5 (rope_parameters) layout."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  rope_type = params.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
  theta = (hf.get('rope_theta') or params.get('rope_theta') or hf.get('rotary_emb_base') or
           10000.0)
  pct = params.get('partial_rotary_factor') or hf.get('rotary_pct')
  return rope_type or 'default', float(theta), pct


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face Llama or GPT-NeoX ``config.json`` dict; ``overrides``
  set our own fields (``scan_layers``, ``dtype``, ...). Unsupported features raise ValueError
  naming the HF field."""
  hf = dict(hf_config)
  model_type = hf.get('model_type')
  if model_type not in ('llama', 'gpt_neox'):
    raise ValueError(f"HF config model_type={model_type!r}; supported: 'llama' (Llama, SmolLM "
                     "and other LlamaForCausalLM checkpoints) and 'gpt_neox' (Pythia).")
  neox = model_type == 'gpt_neox'
  act = hf.get('hidden_act', 'gelu' if neox else 'silu')
  if act != ('gelu' if neox else 'silu'):
    raise ValueError(f"HF config hidden_act={act!r}; only {'gelu' if neox else 'silu'!r} "
                     f'(exact GELU for gpt_neox) is supported for model_type {model_type!r}.')
  if neox:
    if not hf.get('use_parallel_residual', True):
      raise ValueError('HF config use_parallel_residual=False is not supported; only the '
                       'parallel GPT-NeoX block.')
    if not hf.get('attention_bias', True):
      raise ValueError('HF config attention_bias=False is not supported for gpt_neox.')
  else:
    for flag in ('attention_bias', 'mlp_bias'):
      if hf.get(flag):
        raise ValueError(f'HF config {flag}=True; biases are not supported for llama.')
  rope_type, rope_theta, pct = _rope(hf)
  if rope_type != 'default':
    raise ValueError(f'HF config rope scaling {rope_type!r} (rope_scaling/rope_parameters) is '
                     'not supported; only default RoPE.')
  if pct is not None and not neox and pct != 1:
    raise ValueError(f'HF config partial_rotary_factor={pct} is not supported for llama.')
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(f'HF config lacks required field(s) {missing}.')
  heads = hf['num_attention_heads']
  head_dim = 0 if neox else hf.get('head_dim') or 0
  if head_dim * heads == hf['hidden_size']:
    head_dim = 0  # Our default (embed_dim // num_heads).
  fields = dict(
      name='llama', vocab_size=hf['vocab_size'], embed_dim=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads,
      num_kv_heads=heads if neox else hf.get('num_key_value_heads') or heads,
      head_dim=head_dim, mlp_dim=hf['intermediate_size'], rope_theta=rope_theta,
      norm_eps=float(hf.get('layer_norm_eps', 1e-5) if neox else hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      init_std=float(hf.get('initializer_range', 0.02)))
  if neox:
    # transformers' GPT-NeoX default when the config names no rotary fraction: 0.25.
    fields.update(layer_style='gpt_neox', rotary_pct=float(0.25 if pct is None else pct))
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> dict:
  """The ``config.json`` dict of a LlamaForCausalLM or GPTNeoXForCausalLM equivalent to
  ``cfg``; configs that neither can express raise ValueError naming the field."""
  common = {'vocab_size': cfg.vocab_size, 'hidden_size': cfg.embed_dim,
            'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
            'num_attention_heads': cfg.num_heads, 'tie_word_embeddings': cfg.tie_embeddings,
            'initializer_range': cfg.init_std, 'dtype': 'float32'}
  if cfg.layer_style == 'llama':
    if cfg.rotary_pct != 1:
      raise ValueError(f'model.rotary_pct={cfg.rotary_pct}: LlamaForCausalLM export needs 1.')
    return {
        **common, 'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.dims_per_head,
        'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
        'attention_bias': False, 'mlp_bias': False,
    }
  if cfg.num_kv_heads != cfg.num_heads:
    raise ValueError(f'model.num_kv_heads={cfg.num_kv_heads}: GPTNeoXForCausalLM export needs '
                     f'model.num_heads={cfg.num_heads} (no grouped-query attention).')
  if cfg.dims_per_head * cfg.num_heads != cfg.embed_dim:
    raise ValueError(f'model.head_dim={cfg.head_dim}: GPTNeoXForCausalLM export needs '
                     'embed_dim // num_heads.')
  return {
      **common, 'architectures': ['GPTNeoXForCausalLM'], 'model_type': 'gpt_neox',
      'hidden_act': 'gelu', 'layer_norm_eps': cfg.norm_eps, 'use_parallel_residual': True,
      'attention_bias': True, 'rotary_pct': cfg.rotary_pct, 'rotary_emb_base': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta,
                          'partial_rotary_factor': cfg.rotary_pct},
  }


def _tensor_specs(cfg: ModelConfig):
  """(HF name, our loop-layout paths, shape, n_in) per HF tensor.

  ``n_in``: None for tensors stored as they are; 0 for a vector HF stores flattened; k > 0
  for a kernel with k leading input axes (HF stores it transposed, flattened to [out, in]).
  One path: ``shape`` is our parameter's shape. Several (a fused projection): ``shape`` has
  an extra axis -2 indexing the paths (module docstring)."""
  e, f, v = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size
  h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dims_per_head
  if cfg.layer_style == 'gpt_neox':
    specs = [('gpt_neox.embed_in.weight', [('embedder', 'embed', 'embedding')], (v, e), None),
             ('gpt_neox.final_layer_norm.weight', [('final_norm', 'scale')], (e,), None),
             ('gpt_neox.final_layer_norm.bias', [('final_norm', 'bias')], (e,), None)]
    if not cfg.tie_embeddings:
      specs.append(('embed_out.weight', [('embedder', 'lm_head', 'kernel')], (e, v), 1))
    for i in range(cfg.num_layers):
      hf, ours = f'gpt_neox.layers.{i}.', f'layers_{i}'
      qkv_kernels = [(ours, 'attn', p, 'kernel') for p in 'qkv']
      qkv_biases = [(ours, 'attn', p, 'bias') for p in 'qkv']
      specs += [
          (hf + 'attention.query_key_value.weight', qkv_kernels, (e, h, 3, d), 1),
          (hf + 'attention.query_key_value.bias', qkv_biases, (h, 3, d), 0),
          (hf + 'attention.dense.weight', [(ours, 'attn', 'o', 'kernel')], (h, d, e), 2),
          (hf + 'attention.dense.bias', [(ours, 'attn', 'o', 'bias')], (e,), None),
          (hf + 'mlp.dense_h_to_4h.weight', [(ours, 'mlp', 'up', 'kernel')], (e, f), 1),
          (hf + 'mlp.dense_h_to_4h.bias', [(ours, 'mlp', 'up', 'bias')], (f,), None),
          (hf + 'mlp.dense_4h_to_h.weight', [(ours, 'mlp', 'down', 'kernel')], (f, e), 1),
          (hf + 'mlp.dense_4h_to_h.bias', [(ours, 'mlp', 'down', 'bias')], (e,), None),
      ]
      for hf_norm, our_norm in (('input_layernorm', 'attn_norm'),
                                ('post_attention_layernorm', 'mlp_norm')):
        specs += [(f'{hf}{hf_norm}.weight', [(ours, our_norm, 'scale')], (e,), None),
                  (f'{hf}{hf_norm}.bias', [(ours, our_norm, 'bias')], (e,), None)]
    return specs
  specs = [('model.embed_tokens.weight', [('embedder', 'embed', 'embedding')], (v, e), None),
           ('model.norm.weight', [('final_norm', 'scale')], (e,), None)]
  if not cfg.tie_embeddings:
    specs.append(('lm_head.weight', [('embedder', 'lm_head', 'kernel')], (e, v), 1))
  for i in range(cfg.num_layers):
    hf, ours = f'model.layers.{i}.', f'layers_{i}'
    specs += [
        (hf + 'self_attn.q_proj.weight', [(ours, 'attn', 'q', 'kernel')], (e, h, d), 1),
        (hf + 'self_attn.k_proj.weight', [(ours, 'attn', 'k', 'kernel')], (e, hkv, d), 1),
        (hf + 'self_attn.v_proj.weight', [(ours, 'attn', 'v', 'kernel')], (e, hkv, d), 1),
        (hf + 'self_attn.o_proj.weight', [(ours, 'attn', 'o', 'kernel')], (h, d, e), 2),
        (hf + 'mlp.gate_proj.weight', [(ours, 'mlp', 'gate', 'kernel')], (e, f), 1),
        (hf + 'mlp.up_proj.weight', [(ours, 'mlp', 'up', 'kernel')], (e, f), 1),
        (hf + 'mlp.down_proj.weight', [(ours, 'mlp', 'down', 'kernel')], (f, e), 1),
        (hf + 'input_layernorm.weight', [(ours, 'attn_norm', 'scale')], (e,), None),
        (hf + 'post_attention_layernorm.weight', [(ours, 'mlp_norm', 'scale')], (e,), None),
    ]
  return specs


def _hf_shape(shape, n_in):
  if n_in is None:
    return shape
  if n_in == 0:
    return (math.prod(shape),)
  return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _part_shape(shape, paths):
  """Our parameter's shape: ``shape`` without the fused axis -2 when there are several paths."""
  return shape if len(paths) == 1 else shape[:-2] + shape[-1:]


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
  """Reads a HF Llama or GPT-NeoX checkpoint directory -> (ModelConfig, params of float32
  numpy arrays).

  Missing directory/config/weights raise FileNotFoundError; unsupported configs, missing,
  unexpected or mis-shaped tensors raise ValueError naming them.
  """
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'HF checkpoint config {config_path} not found.')
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f), scan_layers=scan_layers)
  tensors = _read_tensors(_weight_files(path))
  head = 'lm_head.weight'
  if cfg.layer_style == 'gpt_neox':
    if head in tensors:  # transformers 5's name of embed_out
      tensors.setdefault('embed_out.weight', tensors.pop(head))
    head = 'embed_out.weight'
  specs = _tensor_specs(cfg)
  wanted = {name for name, *_ in specs}
  if cfg.tie_embeddings:
    wanted.add(head)  # Some tied checkpoints also store it; it is ignored.
  unexpected = sorted(n for n in tensors if n not in wanted
                      and not n.endswith(_IGNORED_TENSOR_SUFFIXES))
  if unexpected:
    raise ValueError(f'Unexpected tensors in {path} for a {cfg.layer_style} model: '
                     f'{unexpected}.')
  params = {}
  for name, paths, shape, n_in in specs:
    if name not in tensors:
      raise ValueError(f'Tensor {name} missing from checkpoint {path}.')
    w = tensors[name]
    if w.shape != _hf_shape(shape, n_in):
      raise ValueError(f'Tensor {name} has shape {w.shape}; config.json implies '
                       f'{_hf_shape(shape, n_in)}.')
    w = (w.T if n_in else w).reshape(shape)
    for j, our_path in enumerate(paths):
      node = params
      for key in our_path[:-1]:
        node = node.setdefault(key, {})
      node[our_path[-1]] = np.ascontiguousarray(w if len(paths) == 1 else w[..., j, :])
  if scan_layers:
    params = stack_layers(params)
  return cfg, params


def export_hf_checkpoint(cfg: ModelConfig, params, path, overwrite=False):
  """Writes ``config.json`` + ``model.safetensors`` (float32) for LlamaForCausalLM or
  GPTNeoXForCausalLM (by ``cfg.layer_style``).

  ``params`` may be in loop or scanned layout (boxed or not). Refuses a non-empty ``path``
  (FileExistsError) unless ``overwrite``; then stale safetensors weights there are removed.
  """
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f'Export directory {path} is not empty; pass overwrite=True.')
  hf_config = config_to_hf(cfg)
  params = nn.meta.unbox(params)
  if 'layers' in params:
    params = unstack_layers(params, cfg.num_layers)
  tensors = {}
  for name, paths, shape, n_in in _tensor_specs(cfg):
    parts = []
    for our_path in paths:
      node = params
      for key in our_path:
        if key not in node:
          raise ValueError(f"Parameter {'/'.join(our_path)} (for {name}) missing from params.")
        node = node[key]
      w = np.asarray(node, np.float32)
      if w.shape != _part_shape(shape, paths):
        raise ValueError(f"Parameter {'/'.join(our_path)} has shape {w.shape}; cfg implies "
                         f'{_part_shape(shape, paths)}.')
      parts.append(w)
    w = parts[0] if len(parts) == 1 else np.stack(parts, axis=-2)
    hf_shape = _hf_shape(shape, n_in)
    tensors[name] = np.ascontiguousarray(w.reshape(hf_shape[::-1]).T if n_in else
                                         w.reshape(hf_shape))
  os.makedirs(path, exist_ok=True)
  for file in os.listdir(path):
    if file == INDEX_NAME or file.endswith('.safetensors'):
      os.remove(os.path.join(path, file))
  save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={'format': 'pt'})
  with open(os.path.join(path, CONFIG_NAME), 'w') as f:
    json.dump(hf_config, f, indent=2)
