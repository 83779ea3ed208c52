# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Block Transformer: global-to-local decoding
#
# Train a tiny Block Transformer (arXiv:2406.02657: a block decoder over blocks of 4 bytes,
# then a token decoder inside each block) and a vanilla Llama-style model of the same width
# on `pycorpus`, generate with the cached block decoding of `BlockEngine`, then measure what
# the architecture is for: decode throughput and KV-cache memory against prompt and output
# length. Colab: *Runtime > Change runtime type > TPU*, then run all.

# %% [markdown]
# ## Setup
# `REPO_URL` is the repository to install from (replace the placeholder with your fork's URL,
# see the README's "Notebooks" section). Inside a checkout the installed package is used.

# %%
REPO_URL = 'https://github.com/OWNER/REPO'

import importlib.util
import subprocess
import sys

if importlib.util.find_spec('launch') is None:  # not inside a checkout: install the package
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'git+{REPO_URL}'], check=True)

# %% tags=["parameters"]
SIZE = 'colab'  # 'colab': 300 steps per model on an accelerator; 'tiny': a few steps on a CPU

# %%
import os
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bench import block_decode
from configs import block_tiny, vanilla_tiny
from launch import notebook
from model.block_transformer import receptive_field
from model.engine import BlockEngine, Request
from model.registry import build_model
from training import metrics, sharding, train
from training.tokenizers import load_tokenizer

SIZE = notebook.size(SIZE)
devices = notebook.show_devices(want_accelerator=SIZE == 'colab')

# %% [markdown]
# ## Configs and mesh
# `configs/block_tiny.py` (block decoder 2 layers + prefix token decoder 2 layers, d=128,
# blocks of L_B = 4 bytes) against `configs/vanilla_tiny.py` (4 layers, d=128): the same width
# and about the same parameters. At `tiny` both shrink to d=32 and 1 + 1 against 2 layers. The
# mesh spans all devices (`data=-1`: data parallel over every TPU core).

# %%
configs = {'vanilla': vanilla_tiny.get_config(), 'block': block_tiny.get_config()}
for name, config in configs.items():
  config.sample.max_new_tokens = 0
  if SIZE == 'colab':
    config.train.update(steps=300, eval_every=100, checkpoint_every=300)
    config.data.batch_size = 16 * len(devices)
  else:
    config.model.update(embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_dim=64)
    config.data.update(seq_len=32, batch_size=len(devices), max_docs=50)
    config.train.update(steps=12, warmup_steps=2, log_every=2, eval_every=12, eval_batches=1,
                        checkpoint_every=12, report_unigram_entropy=False, tensorboard=False)
if SIZE == 'tiny':
  configs['block'].model.update(block_layers=1, token_layers=1)
block_len = configs['block'].model.block_len
mesh = sharding.make_mesh(configs['block'].mesh)
print('mesh', dict(mesh.shape))
for name, config in configs.items():
  print(name, dict(config.model))

# %% [markdown]
# ## Train both
# `train.train_and_evaluate` is the `pretrain` job (`python -m launch.main`); the block model's
# data is packed block-aligned (`data.block_len`: every document starts a block). Rerunning the
# cell resumes from the workdirs.

# %%
workdirs, summaries = {}, {}
for name, config in configs.items():
  workdirs[name] = f'workdirs/notebook_{name}' if SIZE == 'colab' else tempfile.mkdtemp()
  summaries[name] = train.train_and_evaluate(config, workdirs[name])

fig, ax = plt.subplots()
for name, workdir in workdirs.items():
  records = metrics.read_metrics(workdir)
  line, = ax.plot(*zip(*[(r['step'], r['train/loss']) for r in records if 'train/loss' in r]),
                  label=f'{name}: train')
  ax.plot(*zip(*[(r['step'], r['eval/loss']) for r in records if 'eval/loss' in r]), 'o',
          color=line.get_color(), label=f'{name}: validation')
ax.set(xlabel='step', ylabel='loss (nats/byte)', title='Block Transformer vs vanilla')
ax.legend()
plt.show()

models = {name: (build_model(configs[name].model),  # the trained variables, on the host
                 jax.device_get(train.model_variables(summaries[name]['state'])))
          for name in configs}
pd.DataFrame([(name, notebook.param_count(v), summaries[name]['eval/loss'])
              for name, (_, v) in models.items()],
             columns=['model', 'parameters', 'validation loss'])

# %% [markdown]
# ## Generate with cached block decoding
# `BlockEngine` serves each slot at its own offset in its block: a step runs the token decoder
# for every slot and the block decoder only when some slot finishes a block (its greedy output
# equals `model.decode.generate`'s).

# %%
model, variables = models['block']
tokenizer = load_tokenizer(os.path.join(workdirs['block'], 'tokenizer'))
prompts = ['import os\n\ndef ', 'class Path:\n    ', 'for i in range(']
new_tokens = 64 if SIZE == 'colab' else 8
engine = BlockEngine(model, variables, num_slots=len(prompts), max_len=32 + new_tokens)
requests = [Request([tokenizer.bos_id] + tokenizer.encode(p), max_new_tokens=new_tokens)
            for p in prompts]
outputs, stats = engine.run(requests)
print(f"{stats['tokens']} tokens in {stats['steps']} engine steps, "
      f"{stats['tokens_per_s']:.1f} tokens/s (compilation included)")
for prompt, out in zip(prompts, outputs):
  print(repr(prompt), '->', repr(tokenizer.decode(out)))

# %% [markdown]
# ## Global to local: what each decoder sees
# The block decoder attends over whole blocks (one vector per L_B tokens); the token decoder
# attends only to the tokens of the current block, plus its block's context vector.
# `receptive_field` says, for the prediction after token t (row), whether token s (column)
# is attended to directly, reaches it only through the block context, or is in the future. A
# vanilla decoder attends to every earlier token directly, so its KV cache grows by one entry
# per token in every layer; the block decoder's grows by one per block, the token decoder's
# never exceeds a block.

# %%
ids = [tokenizer.bos_id] + tokenizer.encode(prompts[0]) + outputs[0]
length = min(len(ids), 24)
field = receptive_field(block_len, length)
labels = [repr(tokenizer.decode([t]))[1:-1] or '<s>' for t in ids[:length]]
cmap = plt.matplotlib.colors.ListedColormap(['white', 'lightsteelblue', 'navy'])
fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
panels = [('vanilla: every earlier token', np.tril(np.full_like(field, 2))),
          (f'block (L_B = {block_len}): local tokens + block context', field)]
for ax, (title, grid) in zip(axes, panels):
  ax.imshow(grid, cmap=cmap, vmin=0, vmax=2)
  ax.set_xticks(range(length), labels, fontsize=7, rotation=90)
  ax.set_yticks(range(length), labels, fontsize=7)
  ax.set(xlabel='token s', ylabel='prediction after token t', title=title)
  for b in range(0, length, block_len):
    ax.axvline(b - 0.5, color='gray', lw=0.5)
handles = [plt.matplotlib.patches.Patch(color=c, label=l) for c, l in
           [('navy', 'attended directly'), ('lightsteelblue', 'through the block context')]]
axes[1].legend(handles=handles, loc='upper right', fontsize=8)
plt.show()
print('the blocks of the block decoder (BOS first):',
      ' | '.join(''.join(labels[i:i + block_len]) for i in range(0, length, block_len)))

# %% [markdown]
# ## Decode throughput and KV-cache memory
# `bench/block_decode.py`'s measurement on the two trained models: greedy `decode.generate`
# (batched prefill, then one cached step per token) at a prefill-heavy and a decode-heavy
# setting, each model at the largest batch whose parameters + KV cache fit one memory cap
# (the paper's §3.3 setting: the block model's smaller cache fits a larger batch). The cache
# size per sequence comes from the cache's shapes, so it is exact for any length. At `tiny`
# on a CPU the timings are a few milliseconds each, dominated by per-step overhead and the
# machine's load: read the memory curve there, and the throughput at the `colab` size (or
# `docs/BENCHMARKS.md`).

# %%
if SIZE == 'colab':
  settings = {'prefill-heavy': (512, 32), 'decode-heavy': (32, 512)}
  cap_batch, max_batch, rounds = 64, 512, 2
else:
  settings = {'prefill-heavy': (24, 4), 'decode-heavy': (4, 24)}
  cap_batch, max_batch, rounds = 8, 16, 1
longest = max(p + n for p, n in settings.values())
cap = block_decode.memory_bytes(*models['vanilla'], cap_batch, longest)
results = {s: block_decode.throughput(models, p, n, cap, max_batch, rounds)
           for s, (p, n) in settings.items()}
print(f'{block_decode.machine()}; memory cap {cap / block_decode.MIB:.2f} MiB')
pd.DataFrame([dict(setting=f'{s} ({settings[s][0]}/{settings[s][1]})', model=m, batch=r['batch'],
                   **{'tokens/s': round(r['tokens_per_s']),
                      'cache KiB / sequence': r['cache_bytes_per_sequence'] / 1024})
              for s, rows in results.items() for m, r in rows.items()])

# %%
fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(12, 4))
lengths = [2**k for k in range(4, 13)]
for name, (model, _) in models.items():
  ax_mem.plot(lengths, [block_decode.cache_bytes_per_sequence(model, n) / 1024 for n in lengths],
              'o-', label=name)
ax_mem.set(xscale='log', yscale='log', xlabel='prompt + output tokens',
           ylabel='KV cache per sequence (KiB)', title='KV-cache memory')
ax_mem.legend()
x = np.arange(len(results))
for i, name in enumerate(models):
  ax_tps.bar(x + 0.4 * i, [rows[name]['tokens_per_s'] for rows in results.values()], 0.4,
             label=name)
ax_tps.set_xticks(x + 0.2, [f'{s}\n{p}/{n} tokens' for s, (p, n) in settings.items()])
ax_tps.set(ylabel='decode tokens/s (largest batch under the cap)', title='Throughput')
ax_tps.legend()
plt.show()
