"""Attention kernels against XLA and cuDNN, and flash-decoding against XLA decoding.

  python -m bench.attention [--out=bench_attention.json] [--seqs=1024,4096,16384]
  python -m bench.attention --small   # CPU smoke run: tiny sizes, kernels in interpret mode

Training attention (causal, bfloat16, head dim 128, ``--tokens`` tokens per call, so the
batch shrinks as the sequence grows), forward and forward+backward, of:

* ``flash``: ``pallas_kernels.flash_attention.flash_attention`` (skipped, with a message,
  when it is not importable);
* ``xla``: ``model.attention.xla_attention``, our reference (materialises the [T, S] logits;
  may run out of memory at 16k);
* ``dpa``: ``jax.nn.dot_product_attention``, with ``implementation='cudnn'`` when cuDNN's
  fused attention is available, otherwise XLA (the row says which).

FLOPs count the causal half once: 4·B·H·T·S·D/2 forward, 2.5× that for forward+backward.
Each rate is also given as a fraction of a bfloat16 matmul's rate measured in the same
process, and as a ratio to ``dpa``'s rate at the same shape and mode.

Decoding (one new token per row, GQA, bfloat16): ``pallas_kernels.decode_attention`` against
XLA's attention over the same head-major cache (``decode_attention_reference``), at a few
cache lengths, with every row full and with ragged lengths (uniform in [S/8, S]; the kernel
skips the chunks past each row's length, XLA reads the whole cache). GB/s counts the keys and
values below the lengths once. Times are the best of ``--rounds`` rounds of ``--reps``
back-to-back calls. Prints markdown tables and the device, and writes JSON.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.train_throughput import matmul_peak
from model.attention import xla_attention
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference

_DTYPE = jnp.bfloat16


def device_name():
  """The accelerator's kind, or the CPU model on a CPU backend."""
  dev = jax.devices()[0]
  if dev.platform != 'cpu':
    return dev.device_kind
  cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
              if l.startswith('model name')), '') if platform.system() == 'Linux' else ''
  return f'cpu ({cpu or platform.processor()})'


def best_time(fn, args, rounds, reps):
  """Seconds per call: best of ``rounds`` rounds of ``reps`` back-to-back calls (compiled)."""
  jax.block_until_ready(fn(*args))
  best = np.inf
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / reps)
  return best


def implementations():
  """({name: f(q, k, v) -> out}, notes): q [B, T, H, D], k/v [B, S, Hkv, D], causal.

  ``xla`` comes first: the others' forward outputs are compared with its output.
  """
  notes = []

  def positions(x):
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

  impls = {'xla': lambda q, k, v: xla_attention(q, k, v, q_pos=positions(q),
                                                 kv_pos=positions(k))}
  try:
    from pallas_kernels.flash_attention import flash_attention
    impls['flash'] = lambda q, k, v: flash_attention(q, k, v, q_pos=positions(q),
                                                     kv_pos=positions(k), causal=True)
  except ImportError as e:
    notes.append(f'flash: skipped, pallas_kernels.flash_attention not importable ({e}).')
  dpa_impl = 'xla'
  if jax.default_backend() == 'gpu':
    probe = jnp.zeros((1, 128, 2, 128), _DTYPE)
    try:
      jax.block_until_ready(jax.nn.dot_product_attention(probe, probe, probe, is_causal=True,
                                                         implementation='cudnn'))
      dpa_impl = 'cudnn'
    except Exception as e:
      notes.append(f'dpa: cuDNN attention unavailable ({type(e).__name__}: {e}); using XLA.')
  impls[f'dpa ({dpa_impl})'] = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=dpa_impl)
  return impls, notes


def forward_backward(fn):
  """(q, k, v, dout) -> (dq, dk, dv): the forward pass and its VJP."""
  def run(q, k, v, dout):
    _, vjp = jax.vjp(fn, q, k, v)
    return vjp(dout)
  return run


def attention_rows(args, impls, matmul_rate):
  rows = []
  for seq in args.seqs:
    batch = max(1, args.tokens // seq)
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (batch, seq, args.heads, args.head_dim), _DTYPE)
    k, v = (jax.random.normal(key, (batch, seq, args.kv_heads, args.head_dim), _DTYPE)
            for key in keys[1:3])
    dout = jax.random.normal(keys[3], q.shape, _DTYPE)
    flops = 4 * batch * args.heads * seq * seq * args.head_dim / 2
    reference = None
    for mode, mult in (('fwd', 1.0), ('fwd+bwd', 2.5)):
      for name, fn in impls.items():
        row = dict(seq=seq, batch=batch, mode=mode, impl=name, time_ms=None, tflops=None,
                   vs_matmul=None, max_err_vs_xla=None, error=None)
        call = jax.jit(fn if mode == 'fwd' else forward_backward(fn))
        inputs = (q, k, v) if mode == 'fwd' else (q, k, v, dout)
        try:
          seconds = best_time(call, inputs, args.rounds, args.reps)
          if mode == 'fwd':
            out = np.asarray(call(*inputs), np.float32)
            reference = out if name == 'xla' else reference
            if name != 'xla' and reference is not None:
              row['max_err_vs_xla'] = float(np.max(np.abs(out - reference)))
        except Exception as e:  # E.g. XLA out of memory at 16k.
          row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
          rows.append(row)
          continue
        rate = mult * flops / seconds
        row.update(time_ms=seconds * 1e3, tflops=rate / 1e12, vs_matmul=rate / matmul_rate)
        rows.append(row)
  for row in rows:  # Ratio to jax.nn.dot_product_attention at the same shape and mode.
    dpa = next(r for r in rows if r['seq'] == row['seq'] and r['mode'] == row['mode'] and
               r['impl'].startswith('dpa'))
    row['vs_dpa'] = row['tflops'] / dpa['tflops'] if row['tflops'] and dpa['tflops'] else None
  return rows


def decode_rows(args):
  rows = []
  b, h, hkv, d = args.decode_batch, args.heads, args.kv_heads, args.head_dim
  rng = np.random.default_rng(0)
  for s in args.cache_lengths:
    keys = jax.random.split(jax.random.key(s), 3)
    q = jax.random.normal(keys[0], (b, 1, h, d), _DTYPE)
    k, v = (jax.random.normal(key, (b, hkv, s, d), _DTYPE) for key in keys[1:])
    for ragged in (False, True):
      lengths = rng.integers(s // 8, s + 1, b) if ragged else np.full(b, s)
      lengths = jnp.asarray(lengths, jnp.int32)
      kv_pos = jnp.where(jnp.arange(s) < lengths[:, None], jnp.arange(s, dtype=jnp.int32), -1)
      q_pos = (lengths - 1)[:, None]
      kv_bytes = 2 * hkv * d * jnp.dtype(_DTYPE).itemsize * int(jnp.sum(lengths))
      calls = {'pallas': jax.jit(lambda *a: decode_attention(*a[:3], q_pos=a[3], kv_pos=a[4],
                                                              lengths=a[5])),
               'xla': jax.jit(lambda *a: decode_attention_reference(
                   *a[:3], q_pos=a[3], kv_pos=a[4], lengths=a[5]))}
      inputs = (q, k, v, q_pos, kv_pos, lengths)
      seconds = {name: best_time(fn, inputs, args.rounds, args.reps)
                 for name, fn in calls.items()}
      err = np.max(np.abs(np.asarray(calls['pallas'](*inputs), np.float32) -
                          np.asarray(calls['xla'](*inputs), np.float32)))
      rows.append(dict(cache_len=s, batch=b, ragged=ragged, mean_length=float(jnp.mean(lengths)),
                       pallas_us=seconds['pallas'] * 1e6, xla_us=seconds['xla'] * 1e6,
                       pallas_gb_s=kv_bytes / seconds['pallas'] / 1e9,
                       xla_gb_s=kv_bytes / seconds['xla'] / 1e9,
                       speedup=seconds['xla'] / seconds['pallas'], max_err=float(err)))
  return rows


def _fmt(x, spec):
  return '-' if x is None else format(x, spec)


def print_tables(device, matmul_rate, args, attn, decode, notes):
  print(f'device: {device}; bf16 matmul {matmul_rate / 1e12:.3g} TFLOP/s '
        f'({args.matmul_n}^3); heads {args.heads}/{args.kv_heads} (q/kv), head dim '
        f'{args.head_dim}, bfloat16, causal')
  for note in notes:
    print(note)
  print('\n| seq | batch | mode | impl | ms | TFLOP/s | vs matmul | vs dpa | max err vs xla |')
  print('|---|---|---|---|---|---|---|---|---|')
  for r in attn:
    tail = (r['error'] if r['error'] else
            f"{r['time_ms']:.3f} | {r['tflops']:.3g} | {r['vs_matmul']:.1%} | "
            f"{_fmt(r['vs_dpa'], '.2f')}x | {_fmt(r['max_err_vs_xla'], '.2e')}")
    print(f"| {r['seq']} | {r['batch']} | {r['mode']} | {r['impl']} | {tail} |")
  print(f'\nDecode: batch {args.decode_batch}, 1 new token, heads {args.heads}/{args.kv_heads}')
  print('| cache | lengths | pallas µs | xla µs | pallas GB/s | xla GB/s | speed-up | max err |')
  print('|---|---|---|---|---|---|---|---|')
  for r in decode:
    lengths = f"ragged (mean {r['mean_length']:.0f})" if r['ragged'] else 'full'
    print(f"| {r['cache_len']} | {lengths} | {r['pallas_us']:.1f} | {r['xla_us']:.1f} | "
          f"{r['pallas_gb_s']:.1f} | {r['xla_gb_s']:.1f} | {r['speedup']:.2f}x | "
          f"{r['max_err']:.1e} |")


def main(argv=None):
  parser = argparse.ArgumentParser()
  ints = lambda s: [int(x) for x in s.split(',')]
  parser.add_argument('--out', default='bench_attention.json', help='JSON output path.')
  parser.add_argument('--small', action='store_true',
                      help='Tiny sizes, one timed call: checks that the script runs (CPU).')
  parser.add_argument('--seqs', type=ints, default=[1024, 4096, 16384])
  parser.add_argument('--tokens', type=int, default=16384, help='Batch x sequence per call.')
  parser.add_argument('--heads', type=int, default=16)
  parser.add_argument('--kv_heads', type=int, default=8)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--cache_lengths', type=ints, default=[1024, 4096, 16384, 65536])
  parser.add_argument('--decode_batch', type=int, default=8)
  parser.add_argument('--matmul_n', type=int, default=8192)
  parser.add_argument('--rounds', type=int, default=3, help='Timed rounds (best kept).')
  parser.add_argument('--reps', type=int, default=10, help='Back-to-back calls per round.')
  args = parser.parse_args(argv)
  if args.small:
    args.seqs, args.tokens, args.heads, args.kv_heads = [128], 128, 2, 1
    args.cache_lengths, args.decode_batch, args.matmul_n = [96], 2, 128
    args.rounds, args.reps = 1, 1
  matmul_rate = matmul_peak(args.matmul_n, reps=args.rounds * args.reps, dtype=_DTYPE)
  impls, notes = implementations()
  attn = attention_rows(args, impls, matmul_rate)
  decode = decode_rows(args)
  device = device_name()
  print_tables(device, matmul_rate, args, attn, decode, notes)
  with open(args.out, 'w') as f:
    json.dump({'device': device, 'matmul_tflops': matmul_rate / 1e12, 'notes': notes,
               'args': vars(args), 'attention': attn, 'decode': decode}, f, indent=2)
  return {'attention': attn, 'decode': decode, 'notes': notes}


if __name__ == '__main__':
  main()
