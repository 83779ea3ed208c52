"""Vanilla Llama checkpoint -> (Relaxed) Recursive Transformer parameters (PAPERS.md §1).

With L original layers, B loops and block size B' = L//B (middle strategies: (L-2)//B),
the recursive model unrolls to B'·B layers (+2 for the unique first/last of the middle
strategies). When L is not divisible, the original layers kept as the "unrolled
original" are ``round(linspace(0, L-1, B'·B))`` (middle: layers 0 and L-1 plus
``round(linspace(1, L-2, B'·B))`` — the middle rule is our reconstruction); ``round`` is
numpy's half-to-even, as the authors' code. Initialisation of shared layer j (§3.1):

  ``stepwise``  one layer at a fixed interval: fixed-ends ``round(linspace(0, L-1, B'))``
                (middle: ``linspace(1, L-2, B')``); fixed-start ``floor(k·L/B')``, k < B'
                (middle: ``1 + floor(k·(L-2)/B')``);
  ``lower``     layers 0..B'-1 (middle 1..B'); ``upper`` the last B' (middle: before L-1);
  ``average``   the mean of the kept layers tied to j (norms included);
  ``random``    a fresh initialisation of the shared layers (embeddings still copied).

Relaxation (§3.2): every unrolled layer l of a shared layer gets per-loop norms copied from
its kept original layer (``ln_share=False``) and LoRA factors from the truncated SVD of the
residual ``W_l - W'`` in the paper's [out, in] layout: ``U Σ V^T``, ``B = U_r Σ_r``,
``A = V_r^T``; stored as ``a = A^T``, ``b = B^T`` (our kernels are [in, out]). No LoRA
scaling factor, so at full rank the relaxed kernel ``W' + a b`` is the kept original layer's
and, with per-loop norms, the relaxed model equals the unrolled original: the original itself
when L (L - 2 for the middle strategies) is divisible by B, otherwise the original without
the layers ``kept_layers`` drops. The authors' code applies a LoRA scaling of 2 that its SVD
init ignores, so its full-rank relaxed kernel is ``2W - W'`` (PAPERS.md §1). Ranks above
min(in, out) are zero-padded.
"""
import flax.linen as nn
import jax
import numpy as np

from model import param_layout
from model.layers import ModelConfig
from model.recursive import (PROJECTIONS, Recursive, RecursiveConfig, kernel_axes,
                             layer_plan)

INITIALIZATIONS = ('stepwise', 'average', 'lower', 'upper', 'random')
STEPWISE = ('ends', 'start')


def recursive_config(vanilla_cfg: ModelConfig, num_loops: int, sharing='cycle', **fields):
  """The RecursiveConfig with the vanilla model's shapes and B'·B (+2) unrolled layers."""
  middle = sharing.startswith('middle')
  block = (vanilla_cfg.num_layers - 2 * middle) // num_loops
  if block < 1:
    raise ValueError(f'Cannot share {vanilla_cfg.num_layers} layers (sharing={sharing!r}) '
                     f'over num_loops={num_loops} loops.')
  values = {f: getattr(vanilla_cfg, f) for f in vanilla_cfg.__dataclass_fields__}
  values.update(name='recursive', num_layers=block * num_loops + 2 * middle,
                num_loops=num_loops, sharing=sharing, scan_layers=False, **fields)
  return RecursiveConfig(**values)


def kept_layers(num_original: int, cfg: RecursiveConfig):
  """Original layer index of every unrolled layer of the recursive model."""
  n = cfg.num_layers
  if n == num_original:
    return list(range(n))
  if cfg.sharing.startswith('middle'):
    inner = np.round(np.linspace(1, num_original - 2, n - 2)).astype(int).tolist()
    return [0] + inner + [num_original - 1]
  return np.round(np.linspace(0, num_original - 1, n)).astype(int).tolist()


def init_sources(num_original: int, cfg: RecursiveConfig, initialization: str,
                 stepwise: str = 'ends'):
  """Per unique layer, the original layers whose mean initialises it ([] for random)."""
  if initialization not in INITIALIZATIONS:
    raise ValueError(f'initialization={initialization!r}; expected one of {INITIALIZATIONS}.')
  if stepwise not in STEPWISE:
    raise ValueError(f'stepwise={stepwise!r}; expected one of {STEPWISE}.')
  L, size = num_original, cfg.block_size
  middle = cfg.sharing.startswith('middle')
  lo, hi = int(middle), L - 1 - int(middle)  # Range of the shared originals.
  if initialization == 'random':
    shared = [[] for _ in range(size)]
  elif initialization == 'stepwise' and stepwise == 'ends':
    shared = [[int(i)] for i in np.round(np.linspace(lo, hi, size)).astype(int)]
  elif initialization == 'stepwise':
    shared = [[lo + k * (hi - lo + 1) // size] for k in range(size)]
  elif initialization == 'lower':
    shared = [[lo + k] for k in range(size)]
  elif initialization == 'upper':
    shared = [[hi - size + 1 + k] for k in range(size)]
  else:
    kept = kept_layers(L, cfg)
    shared = [[kept[l] for l, (j, loop) in enumerate(layer_plan(cfg))
               if j == k + middle and loop is not None] for k in range(size)]
  return [[0]] + shared + [[L - 1]] if middle else shared


def svd_lora(residual, n_in: int, rank: int):
  """(a [in..., r], b [r, out...]) with ``a @ b`` the best rank-r approximation of the
  kernel ``residual`` [in..., out...] (float64 SVD; zero-padded above its full rank)."""
  ins, outs = residual.shape[:n_in], residual.shape[n_in:]
  r_t = np.asarray(residual, np.float64).reshape(int(np.prod(ins)), -1).T  # [out, in]
  u, s, vt = np.linalg.svd(r_t, full_matrices=False)
  k = min(rank, s.size)
  a = np.zeros((r_t.shape[1], rank))
  b = np.zeros((rank, r_t.shape[0]))
  a[:, :k] = vt[:k].T                      # A^T, A = V_r^T
  b[:k] = (u[:, :k] * s[:k]).T             # B^T, B = U_r Σ_r
  return (a.reshape(ins + (rank,)).astype(np.float32),
          b.reshape((rank,) + outs).astype(np.float32))


def convert_params(params, vanilla_cfg: ModelConfig, cfg: RecursiveConfig,
                   initialization: str = 'stepwise', stepwise: str = 'ends', rng=None):
  """Recursive parameters (float32 numpy) from vanilla Llama ``params`` (loop or scan layout).

  ``rng`` seeds the ``random`` initialisation of the shared layers; the shapes
  of ``vanilla_cfg`` must match ``cfg``'s (``recursive_config`` builds a matching one).
  """
  if 'layers' in params:
    params = param_layout.unstack_layers(params, vanilla_cfg.num_layers)
  params = jax.tree.map(np.asarray, params)
  L = vanilla_cfg.num_layers
  init = lambda: nn.meta.unbox(Recursive(cfg).init(
      jax.random.PRNGKey(0) if rng is None else rng, np.zeros((1, 1), np.int32))['params'])
  # Fresh values are only used by ``random``; otherwise only the tree's keys are read.
  fresh = jax.tree.map(np.asarray, init()) if initialization == 'random' else jax.eval_shape(init)
  mean = lambda trees: jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *trees)
  out = {'embedder': params['embedder'], 'final_norm': params['final_norm']}
  for j, sources in enumerate(init_sources(L, cfg, initialization, stepwise)):
    name = f'layers_{j}'
    layer = mean([params[f'layers_{s}'] for s in sources]) if sources else fresh[name]
    out[name] = {k: v for k, v in layer.items() if k in fresh[name]}
  kept = kept_layers(L, cfg)
  for l, (j, loop) in enumerate(layer_plan(cfg)):
    if loop is None:
      continue
    original = params[f'layers_{kept[l]}']
    if f'norms_{l}' in fresh:
      out[f'norms_{l}'] = {n: original[n] for n in fresh[f'norms_{l}']}
    if f'lora_{l}' in fresh:
      lora = {}
      for proj in fresh[f'lora_{l}']:
        module = PROJECTIONS[proj][0]
        n_in = len(kernel_axes(cfg)[proj][0][0])
        residual = original[module][proj]['kernel'] - out[f'layers_{j}'][module][proj]['kernel']
        a, b = svd_lora(residual, n_in, cfg.rank(proj))
        lora[proj] = {'a': a, 'b': b}
      out[f'lora_{l}'] = lora
  return out
