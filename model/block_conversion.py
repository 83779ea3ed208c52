"""Vanilla checkpoint -> Block Transformer parameters: uptraining (Ho et al. 2024,
arXiv:2406.02657, the uptraining experiment; model in ``model.block_transformer``).

The authors' rule (their code, ``load_block_from_vanilla_checkpoint``, as configured for
their uptraining runs, ``method: partition``), reproduced here:

* Layers, ``split='partition'`` (default): block decoder layer i <- vanilla layer i
  (i < block_layers); token decoder layer j <- vanilla layer block_layers + j; the two depths
  must add up to the source's depth exactly. Their other two splits are here too:
  ``'skip'`` (both decoders take vanilla layers 0, 2, 4, ...; each decoder has half the
  source's depth) and ``'duplicate'`` (both decoders take every vanilla layer; each has the
  source's depth). Layer subtrees are copied as they are, whatever their internals (any
  ``layer_style`` of the source; the block model is built with the source's ModelConfig).
* Token decoder: token embedding, LM head (when untied) and final norm <- the vanilla model's.
* Prefix token decoder: the expansion (prefix) projection is "identity-initialised": each of
  the ``r = expansion_ratio`` prefix vectors equals the context (the block decoder's output,
  or the start context for a document's first block) exactly. Ours is the bias-free kernel
  ``K[i, k, o] = δ_io`` of ``prefix_proj`` ([embed, r, token_embed]); theirs a 1x1 convolution
  with identity blocks and a zero bias, the same map.
* The block decoder's final norm is not copied (their block decoder keeps its fresh norm): a
  fresh RMSNorm, scale 1.

Where theirs does not map onto our model (our choices):

* Block embedder. Theirs embeds each token at the full width d with the vanilla embedding and
  a projection layer initialised to the mean, so a block's embedding starts as the mean of its
  tokens' vanilla embeddings. Our ``lookup`` embedder concatenates ``block_len`` embeddings of
  width d / L_B from one table and has no projection, so no copy of the vanilla table (width
  d) gives that mean: ``block_embed`` keeps its fresh initialisation and is learned while
  uptraining.
* ``start_context`` (the learned context of a document's first block; theirs has none):
  fresh initialisation.
* ``summation`` token decoder (theirs: identity expansion is for ``prefix`` only): the context
  is added to every input unprojected (equal widths), and ``start_token`` is zero, so the
  first slot's input is the context itself, as for a prefix decoder with r = 1.
* Widths: both decoders take the source's layers, so ``token_embed_dim`` must be 0 or the
  source's ``embed_dim`` (no ``context_proj``); other widths raise ValueError.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import param_layout
from model.block_transformer import BlockConfig, BlockTransformer
from model.layers import ModelConfig

SPLITS = ('partition', 'skip', 'duplicate')
BLOCK_FIELDS = ('block_len', 'block_layers', 'token_layers', 'token_embed_dim',
                'token_decoder', 'expansion_ratio', 'predict_first_block')
# Fields that are not shapes: the block model may set them differently from the source.
_FREE_FIELDS = BLOCK_FIELDS + ('name', 'scan_layers', 'remat', 'dtype', 'attention_impl',
                               'init_std')


def layer_sources(num_layers: int, cfg: BlockConfig, split: str = 'partition'):
  """(block decoder sources, token decoder sources): the vanilla layer index of every layer.

  Raises ValueError naming ``model.block_layers`` / ``model.token_layers`` and the source
  depth when the two depths do not fit it as ``split`` requires.
  """
  b, t = cfg.block_depth, cfg.token_config.num_layers
  if split not in SPLITS:
    raise ValueError(f'uptrain.layer_split={split!r}; expected one of {SPLITS}.')
  need = {'partition': b + t == num_layers,
          'skip': 2 * b == num_layers and 2 * t == num_layers,
          'duplicate': b == num_layers and t == num_layers}[split]
  if not need:
    rule = {'partition': 'block_layers + token_layers = the source depth',
            'skip': 'block_layers = token_layers = half the source depth',
            'duplicate': 'block_layers = token_layers = the source depth'}[split]
    raise ValueError(
        f'config.model.block_layers={cfg.block_layers} and config.model.token_layers='
        f'{cfg.token_layers} (depths {b} and {t}; 0 means model.num_layers) do not fit the '
        f'source depth {num_layers}: uptrain.layer_split={split!r} needs {rule}.')
  if split == 'partition':
    return list(range(b)), list(range(b, b + t))
  if split == 'skip':
    return list(range(0, num_layers, 2)), list(range(0, num_layers, 2))
  return list(range(b)), list(range(t))


def block_config(vanilla_cfg: ModelConfig, split: str = 'partition', **fields) -> BlockConfig:
  """The BlockConfig with the vanilla model's shapes (every ModelConfig field, e.g. its layer
  style) and ``fields`` (the Block Transformer options, ``BLOCK_FIELDS``, and ``dtype``,
  ``remat``, ``scan_layers``). Checks widths and depths (``layer_sources``)."""
  values = {f.name: getattr(vanilla_cfg, f.name) for f in dataclasses.fields(vanilla_cfg)}
  for name, value in fields.items():
    if name not in _FREE_FIELDS and name in values and value != values[name]:
      raise ValueError(f'config.model.{name}={value!r} differs from the source model\'s '
                       f'{values[name]!r}: uptraining keeps the source\'s shapes.')
  values.update(fields, name='block')
  cfg = BlockConfig(**values)
  if cfg.token_width != vanilla_cfg.embed_dim:
    raise ValueError(f'config.model.token_embed_dim={cfg.token_embed_dim} must be 0 or the '
                     f'source\'s embed_dim={vanilla_cfg.embed_dim}: the token decoder takes '
                     'the source\'s layers.')
  layer_sources(vanilla_cfg.num_layers, cfg, split)
  return cfg


def convert_params(vanilla_params, vanilla_cfg: ModelConfig, cfg: BlockConfig, rng=None,
                   split: str = 'partition'):
  """Block Transformer parameters (float32 numpy, loop or scan layout as ``cfg.scan_layers``)
  from vanilla ``params`` (loop or scan layout); see the module docstring for the mapping.
  ``rng`` (default ``PRNGKey(0)``) initialises the parameters the source has no counterpart
  for (``block_embed``, ``block_norm``, ``start_context``)."""
  if cfg.token_width != vanilla_cfg.embed_dim or cfg.embed_dim != vanilla_cfg.embed_dim:
    raise ValueError(f'Block model widths (model.embed_dim={cfg.embed_dim}, token width '
                     f'{cfg.token_width}) must equal the source\'s embed_dim='
                     f'{vanilla_cfg.embed_dim}; build cfg with block_config.')
  block_src, token_src = layer_sources(vanilla_cfg.num_layers, cfg, split)
  params = nn.meta.unbox(vanilla_params)
  if 'layers' in params:
    params = param_layout.unstack_layers(params, vanilla_cfg.num_layers)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)
  init = lambda: nn.meta.unbox(BlockTransformer(loop_cfg).init(
      jax.random.PRNGKey(0) if rng is None else rng, jnp.zeros((1, cfg.block_len), jnp.int32))
                               ['params'])
  fresh = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.jit(init)())
  out = dict(fresh, embedder=params['embedder'], final_norm=params['final_norm'])
  for prefix, sources in (('block_layers', block_src), ('token_layers', token_src)):
    for i, s in enumerate(sources):
      out[f'{prefix}_{i}'] = params[f'layers_{s}']
  if cfg.token_decoder == 'prefix':
    eye = np.eye(cfg.embed_dim, dtype=np.float32)
    out['prefix_proj'] = dict(fresh['prefix_proj'],  # a bias (gpt_neox) stays zero
                              kernel=np.repeat(eye[:, None, :], cfg.expansion_ratio, axis=1))
  else:
    out['start_token'] = np.zeros_like(fresh['start_token'])
  _check_tree(out, fresh)
  if cfg.scan_layers:
    out = param_layout.stack_layers(param_layout.stack_layers(out, 'block_layers'),
                                    'token_layers')
  return out


def _check_tree(out, target):
  """Raises ValueError unless ``out`` has ``target``'s tree and shapes (a source whose layers
  or embedder differ from the block model's)."""
  shapes = lambda tree: {jax.tree_util.keystr(p): x.shape
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = shapes(out), shapes(target)
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:4]
    raise ValueError('Converted parameters do not match the block model (path, converted, '
                     f'expected): {[(k, got.get(k), want.get(k)) for k in diff]}.')
