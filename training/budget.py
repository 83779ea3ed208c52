"""Per-device budgets: how the global batch splits over devices and micro-batches, the
memory a compiled train step needs against what a device has, and model FLOP utilisation.

The config states the global batch (``config.data.batch_size`` sequences, the paper's);
``plan_batch`` derives the micro-batch per device and the accumulation steps from the mesh:

  global batch = micro_batch_per_device x batch shards x accumulation steps

``config.train.grad_accum > 0`` fixes the accumulation steps, else
``config.train.micro_batch_per_device > 0`` fixes the micro-batch, else (both 0) the trainer
picks the largest micro-batch whose compiled step fits the device's memory
(``Trainer.compile``).
"""
import dataclasses
import math
import os
from typing import Optional

import jax

from model.config_errors import ConfigError
from training import sharding

GiB = 2**30


def format_bytes(n):
  """``n`` bytes in GiB, or MiB below one GiB."""
  return f'{n / GiB:.2f} GiB' if n >= GiB else f'{n / 2**20:.1f} MiB'


# ---------------------------------------------------------------------------------------
# The batch.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchPlan:
  global_batch: int  # sequences per optimizer step (config.data.batch_size)
  shards: int  # devices over the mesh's batch axes
  micro_batch_per_device: Optional[int]  # None: to be chosen from the memory estimate

  @property
  def per_device(self):
    return self.global_batch // self.shards

  @property
  def accum(self):
    return self.per_device // self.micro_batch_per_device

  def with_micro(self, micro):
    return dataclasses.replace(self, micro_batch_per_device=micro)

  def candidates(self):
    """Micro-batches per device that split the per-device batch evenly, smallest first."""
    if self.micro_batch_per_device is not None:
      return [self.micro_batch_per_device]
    return [m for m in range(1, self.per_device + 1) if self.per_device % m == 0]

  def describe(self, mesh):
    micro = self.micro_batch_per_device
    split = ('micro-batch chosen from the memory estimate' if micro is None else
             f'{self.accum} micro-batch(es) of {micro} per device')
    return (f'global batch {self.global_batch} sequences over mesh {dict(mesh.shape)} '
            f'({self.shards} batch shard(s)): {self.per_device} per device, {split}')


def plan_batch(config, mesh) -> BatchPlan:
  """The batch plan for ``mesh``; a ConfigError naming the fields if they do not divide."""
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  batch = config.data.batch_size
  accum = config.train.get('grad_accum', 1)
  micro = config.train.get('micro_batch_per_device', 0)
  if accum < 0 or micro < 0:
    raise ConfigError(f'config.train.grad_accum={accum} and config.train.micro_batch_per_device='
                      f'{micro} must be >= 0 (0: derived).')
  if batch % shards:
    raise ConfigError(
        f'config.data.batch_size={batch} (the global batch) does not split over the {shards} '
        f'devices of the mesh axes {sharding.BATCH_AXES} ({dict(mesh.shape)}); use a multiple '
        f'of {shards}.')
  per_device = batch // shards
  if accum and micro and accum * micro != per_device:
    raise ConfigError(
        f'config.train.grad_accum={accum} x config.train.micro_batch_per_device={micro} must '
        f'equal config.data.batch_size={batch} / {shards} batch shards = {per_device}; set one '
        'of them to 0 to derive it.')
  if accum:
    if per_device % accum:
      raise ConfigError(
          f'config.data.batch_size={batch} over {shards} batch shards is {per_device} sequences '
          f'per device, not divisible by config.train.grad_accum={accum}.')
    micro = per_device // accum
  elif micro and per_device % micro:
    raise ConfigError(
        f'config.data.batch_size={batch} over {shards} batch shards is {per_device} sequences '
        f'per device, not divisible by config.train.micro_batch_per_device={micro}.')
  return BatchPlan(batch, shards, micro or None)


# ---------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------
def host_memory_bytes():
  """Host memory this process can still take: the kernel's MemAvailable (other processes'
  use excluded), capped by the cgroup's remaining allowance; physical RAM where unknown."""
  available = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    with open('/sys/fs/cgroup/memory.max') as f, open('/sys/fs/cgroup/memory.current') as g:
      limit, used = f.read().strip(), g.read().strip()
    if limit.isdigit() and used.isdigit():
      available = min(available, int(limit) - int(used))
  except OSError:
    pass
  return available


def memory_limit(config, device):
  """(bytes per device, where the number comes from); (None, reason) when unknown.

  ``config.train.memory_limit_bytes`` if set; else the backend's ``bytes_limit``; on CPU the
  host memory available now (``host_memory_bytes``) divided over its (possibly fake) CPU
  devices.
  """
  override = config.train.get('memory_limit_bytes', 0)
  if override:
    return int(override), 'config.train.memory_limit_bytes'
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without memory stats
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f"{device.device_kind} memory_stats()['bytes_limit']"
  if device.platform == 'cpu':
    n = len(jax.local_devices(backend='cpu'))
    return host_memory_bytes() // n, f'available host RAM over {n} CPU device(s)'
  return None, f'{device.device_kind} reports no memory limit'


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """XLA's per-device memory analysis of a compiled step (bytes)."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int  # outputs that reuse donated argument buffers

  @property
  def total(self):
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @classmethod
  def of(cls, compiled):
    mem = compiled.memory_analysis()
    if mem is None:
      return None
    get = lambda name: int(getattr(mem, name, 0) or 0)
    return cls(get('argument_size_in_bytes'), get('output_size_in_bytes'),
               get('temp_size_in_bytes'), get('alias_size_in_bytes'))

  def describe(self):
    f = format_bytes
    return (f'{f(self.total)} per device (XLA memory analysis: arguments {f(self.arguments)} '
            f'+ outputs {f(self.outputs)} + temporaries {f(self.temporaries)} - aliased '
            f'{f(self.aliased)})')


def memory_verdict(estimate, limit, source):
  """One line: the estimate against the limit, and whether it fits."""
  if estimate is None:
    return 'memory: the backend gives no memory analysis; not checked'
  if limit is None:
    return f'memory: {estimate.describe()}; limit unknown ({source}), not checked'
  word = 'fits' if estimate.total <= limit else 'DOES NOT FIT'
  return f'memory: {estimate.describe()} vs limit {format_bytes(limit)} ({source}): {word}'


def knobs(config, plan):
  """The settings that trade memory, with their current values (for error messages)."""
  model = config.model
  return (f'config.train.micro_batch_per_device (now {plan.micro_batch_per_device}; 0 picks '
          f'the largest that fits, accumulation keeps config.data.batch_size='
          f'{plan.global_batch}), config.model.remat (now {model.get("remat", False)}) with '
          f'config.model.remat_policy (now {model.get("remat_policy", "full")!r}; \'full\' '
          'keeps least), config.model.attention_impl (now '
          f'{model.get("attention_impl", "xla")!r}; \'pallas\' does not keep attention '
          'scores), or more devices on the mesh\'s batch/fsdp axes')


# ---------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------
def analytic_flops_per_token(cfg, non_embedding_params, seq_len):
  """Training FLOPs per token: 6N for the matmuls plus 12·L·H·D·T for attention (PaLM, App. B).

  The LM head's matmul (tied or not) is counted too: 6·V·E. Configs whose tokens do not use
  every parameter exactly once (shared or routed layers) count themselves with a
  ``flops_per_token(seq_len)`` method.
  """
  if hasattr(cfg, 'flops_per_token'):
    return cfg.flops_per_token(seq_len)
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dims_per_head * seq_len
  return 6 * (non_embedding_params + cfg.vocab_size * cfg.embed_dim) + attn


# Dense peak FLOP/s per device by compute dtype, from the vendors' data sheets (no
# sparsity), matched as substrings of ``device.device_kind`` in order (more specific
# names first). float32 is absent: XLA runs float32 matmuls as TF32 or bf16 passes
# depending on the precision flags, so no single peak applies; set
# config.train.peak_flops_per_device instead.
PEAK_FLOPS = (
    ('H100 PCIe', {'bfloat16': 756e12, 'float16': 756e12}),
    ('H100', {'bfloat16': 989e12, 'float16': 989e12}),
    ('H200', {'bfloat16': 989e12, 'float16': 989e12}),
    ('A100', {'bfloat16': 312e12, 'float16': 312e12}),
    ('TPU v4', {'bfloat16': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12}),
    ('TPU v5e', {'bfloat16': 197e12}),
    ('TPU v5', {'bfloat16': 459e12}),  # v5p
    ('TPU v6', {'bfloat16': 918e12}),  # v6e (Trillium)
)


def peak_flops(config, device):
  """Peak FLOP/s of one device for ``config.model.dtype``; None when unknown (CPU, f32)."""
  override = config.train.get('peak_flops_per_device', 0.0)
  if override:
    return float(override)
  dtype = config.model.get('dtype', 'float32')
  for name, peaks in PEAK_FLOPS:
    if name in device.device_kind:
      return peaks.get(dtype)
  return None
