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
# # Mixture-of-Recursions quickstart
#
# Train a tiny Mixture-of-Recursions model (arXiv:2507.10524; expert-choice routers, a shared
# block applied up to 3 times, `middle_cycle`) on `pycorpus`, then generate with the MoR
# depth-wise batching engine (`model/mor_engine.py`) and colour each generated token by the
# number of recursions it took. Colab: *Runtime > Change runtime type > TPU*, then run all.

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
SIZE = 'colab'  # 'colab': a few hundred steps on an accelerator; 'tiny': ~20 steps on a CPU

# %%
import os
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from configs import mor_tiny
from launch import notebook
from model import mor_engine
from model.engine import Request
from training import checkpoint, metrics, sharding, train
from training.tokenizers import load_tokenizer

SIZE = notebook.size(SIZE)
devices = notebook.show_devices(want_accelerator=SIZE == 'colab')

# %% [markdown]
# ## Config and mesh
# `configs/mor_tiny.py` at full size on Colab; at `tiny` a much smaller model and batch. The
# mesh spans all devices (`data=-1`: data parallel over every TPU core).

# %%
config = mor_tiny.get_config()
config.sample.max_new_tokens = 0
if SIZE == 'colab':
  config.train.update(steps=300, eval_every=100, checkpoint_every=300)
  config.data.batch_size = 16 * len(devices)
else:
  config.model.update(embed_dim=32, num_layers=4, num_recursions=2, num_heads=2, num_kv_heads=1,
                      mlp_dim=64)
  config.data.update(seq_len=32, batch_size=len(devices), max_docs=50)
  config.train.update(steps=20, warmup_steps=2, log_every=2, eval_every=10, eval_batches=1,
                      checkpoint_every=20, report_unigram_entropy=False, tensorboard=False)
mesh = sharding.make_mesh(config.mesh)
print('mesh', dict(mesh.shape), '| model', dict(config.model))

# %% [markdown]
# ## Train
# `train.train_and_evaluate` is the `pretrain` job (`python -m launch.main`): checkpoints,
# `metrics.jsonl` and `summary.json` go to `workdir`; rerunning the cell resumes.

# %%
workdir = 'workdirs/mor_quickstart' if SIZE == 'colab' else tempfile.mkdtemp()
summary = train.train_and_evaluate(config, workdir)
print({k: v for k, v in summary.items() if k != 'state'})

# %%
records = metrics.read_metrics(workdir)
train_pts = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
eval_pts = [(r['step'], r['eval/loss']) for r in records if 'eval/loss' in r]
plt.plot(*zip(*train_pts), label='train')
if eval_pts:
  plt.plot(*zip(*eval_pts), 'o-', label='validation')
plt.xlabel('step')
plt.ylabel('loss (nats/token)')
plt.legend()
plt.show()

# %% [markdown]
# ## Generate with depth-wise batching
# `MoREngine` serves every slot's token at its own recursion; `stats['depths']` holds each
# generated token's number of recursions and `stats['exits_per_depth']` their histogram.

# %%
model, variables = checkpoint.load_model(workdir)
tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
prompts = ['import os\n\ndef ', 'class Path:\n    ', 'for i in range(']
new_tokens = 96 if SIZE == 'colab' else 12
engine = mor_engine.MoREngine(model.cfg, variables, num_slots=len(prompts),
                              max_len=64 + new_tokens)
requests = [Request([tokenizer.bos_id] + tokenizer.encode(p), max_new_tokens=new_tokens)
            for p in prompts]
outputs, stats = engine.run(requests)
print(f"{stats['tokens']} tokens in {stats['steps']} engine steps, "
      f"{stats['tokens_per_s']:.1f} tokens/s; exits per depth {stats['exits_per_depth']}")

# %%
num_depths = model.cfg.num_recursions + 1
for prompt, out, depths in zip(prompts, outputs, stats['depths']):
  pieces = [tokenizer.decode([t]) for t in out]
  display(HTML(notebook.depth_html(prompt, pieces, depths, num_depths)))

# %%
plt.bar(range(num_depths), stats['exits_per_depth'])
plt.xticks(range(num_depths))
plt.xlabel('recursions taken')
plt.ylabel('generated tokens')
plt.title('MoR depth histogram')
plt.show()
