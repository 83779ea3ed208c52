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
# # Relaxed Recursive Transformer from a Hugging Face checkpoint
#
# Import a Llama-architecture checkpoint (SmolLM on Colab), convert it to a Relaxed Recursive
# Transformer (Bae et al., arXiv:2410.20672, §3: layers tied across loops, initialised from
# the original's, plus depth-wise LoRA initialised by SVD of the residuals), uptrain it a few
# steps with distillation from the original, and compare loss and parameter counts.
# Colab: *Runtime > Change runtime type > TPU*, then run all.

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
SIZE = 'colab'  # 'colab': SmolLM-135M from the hub; 'tiny': a random tiny Llama on a CPU
HF_MODEL = 'HuggingFaceTB/SmolLM-135M'  # hub name (colab size)
NUM_LOOPS = 3  # loops of the shared block (30 layers -> 10 shared ones)
SHARING = 'cycle'  # 'cycle', 'sequence', 'middle_cycle', 'middle_sequence'
INITIALIZATION = 'stepwise'  # 'stepwise', 'average', 'lower', 'upper', 'random'
LORA_RANK = 64  # depth-wise LoRA rank (0: a plain Recursive Transformer)
DISTILL = 1.0  # weight of KL(original || recursive) in the loss

# %%
import os
import tempfile

import flax
import jax
import matplotlib.pyplot as plt
import pandas as pd

from configs import recursive_tiny
from launch import notebook
from model import registry
from model.llama import Llama
from training import data, metrics, sharding, tokenizers, train, uptrain

SIZE = notebook.size(SIZE)
devices = notebook.show_devices(want_accelerator=SIZE == 'colab')

# %% [markdown]
# ## The source checkpoint
# On Colab SmolLM from the hub (weights and `tokenizer.json`); at `tiny` a randomly initialised
# `transformers.LlamaForCausalLM` with a byte-sized vocabulary, saved to a temporary directory
# (with `NUM_LOOPS` and `LORA_RANK` scaled down to its 4 layers of width 32).

# %%
if SIZE == 'colab':
  from huggingface_hub import snapshot_download
  source = snapshot_download(HF_MODEL, allow_patterns=['*.json', '*.safetensors'])
else:
  import torch
  import transformers
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
  source = tempfile.mkdtemp()
  hf_model.save_pretrained(source)
  NUM_LOOPS, LORA_RANK = 2, 8  # 4 layers of width 32: 2 shared layers x 2 loops
notebook.require_file(os.path.join(source, 'config.json'), 'Hugging Face config')
source_cfg, source_params = uptrain.load_source(source)
print(f'{source}: {source_cfg.num_layers} layers, d={source_cfg.embed_dim}, '
      f'{notebook.param_count(source_params) / 1e6:.2f}M parameters')

# %% [markdown]
# ## Config and mesh
# The `uptrain` job's config (`configs/recursive_tiny.py` with this notebook's parameters).

# %%
config = recursive_tiny.get_config()
config.model.update(num_loops=NUM_LOOPS, sharing=SHARING, lora_rank=LORA_RANK)
config.uptrain.update(source=source, initialization=INITIALIZATION, distill=DISTILL)
if SIZE == 'colab':
  config.tokenizer.update(kind='huggingface', path=os.path.join(source, 'tokenizer.json'))
  config.data.update(seq_len=256, batch_size=8 * len(devices))
  config.train.update(steps=100, warmup_steps=10, eval_every=50, checkpoint_every=100,
                      eval_batches=8, learning_rate=3e-4)
else:
  config.data.update(seq_len=32, batch_size=len(devices), max_docs=50)
  config.train.update(steps=10, warmup_steps=2, log_every=2, eval_every=10, eval_batches=1,
                      checkpoint_every=10, tensorboard=False)
mesh = sharding.make_mesh(config.mesh)
print('mesh', dict(mesh.shape))

# %% [markdown]
# ## Evaluate the original and the converted model, then uptrain
# `uptrain.prepare` is the conversion the `uptrain` job runs before training
# (`model.conversion`: tied layers, `INITIALIZATION`, SVD-initialised LoRA).

# %%
tokenizer = tokenizers.make_tokenizer(config.tokenizer, save=False)
eval_data = data.make_dataset(config.data, tokenizer, 'validation', seed=config.seed)


def validation_loss(model, params):
  eval_step = jax.jit(train.make_eval_step(model))
  return train.evaluate(eval_step, {'params': params}, eval_data, mesh,
                        config.train.eval_batches)['eval/loss']


converted_config, converted_params, _ = uptrain.prepare(config)
source_loss = validation_loss(Llama(source_cfg), source_params)
converted_loss = validation_loss(registry.build_model(converted_config.model), converted_params)
workdir = 'workdirs/relaxed_recursive' if SIZE == 'colab' else tempfile.mkdtemp()
uptrained = uptrain.uptrain(config, workdir)

# %%
lora = sum(notebook.param_count(v) for k, v in
           flax.traverse_util.flatten_dict(converted_params, sep='/').items() if 'lora' in k)
total = notebook.param_count(converted_params)
table = pd.DataFrame([
    ('original', notebook.param_count(source_params), 0, source_loss),
    ('recursive, converted', total, lora, converted_loss),
    (f'recursive, uptrained {config.train.steps} steps', total, lora, uptrained['eval/loss']),
], columns=['model', 'parameters', 'of which LoRA', 'validation loss'])
table

# %%
records = metrics.read_metrics(workdir)
fig, (ax_loss, ax_params) = plt.subplots(1, 2, figsize=(11, 4))
steps, losses = zip(*[(r['step'], r['train/loss']) for r in records if 'train/loss' in r])
ax_loss.plot(steps, losses, label='recursive: train loss (LM + distillation)')
for name, loss, style in [('original', source_loss, '--'),
                          ('converted', converted_loss, ':'),
                          ('uptrained', uptrained['eval/loss'], '-.')]:
  ax_loss.axhline(loss, linestyle=style, color='gray')
  ax_loss.annotate(f'{name} (validation)', (0, loss), fontsize=8)
ax_loss.set(xlabel='uptraining step', ylabel='loss', title='Loss')
ax_loss.legend()
ax_params.bar(table['model'].str.split(',').str[0].unique(),
              [table['parameters'][0] / 1e6, total / 1e6])
ax_params.set(ylabel='parameters (M)', title='Parameter count')
plt.show()
