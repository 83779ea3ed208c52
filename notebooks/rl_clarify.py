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
# # Steerable clarification with ReST
#
# A miniature of "Steerable clarification policies via self-play" (arXiv:2512.04068): an
# assistant gets an ambiguous question (`where does kim live ?`, several people are called
# kim) and the costs of the episode, alpha per clarifying question and beta per word of the
# answer, and chooses to **answer** the most likely reading, **enumerate** every reading, or
# **ask** which one is meant. The environment (`rl/envs/clarify.py`) knows the Bayes-optimal
# choice exactly; a steerable policy should follow it as the costs change. Here: supervised
# warm start (SFT) on the environment's demonstrations, one short ReST round with self-play
# rollouts, then the policy's action rates against alpha next to the optimum's. Colab:
# *Runtime > Change runtime type > TPU*, then run all.

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
SIZE = 'colab'  # 'colab': the configs' SFT and one ReST round on an accelerator; 'tiny': a CPU

# %%
import json
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from configs.rl import clarify as clarify_config
from launch import notebook
from rl import envs, repro_clarify, rest
from rl.envs import clarify
from training import metrics, sharding

SIZE = notebook.size(SIZE)
devices = notebook.show_devices(want_accelerator=SIZE == 'colab')

# %% [markdown]
# ## The environment
# One episode as the assistant sees it (its private system turn holds the costs and the
# people called by the name, with their priors in percent and their cities), and the expected
# reward of each first action: answer `p_max - beta`, enumerate `1 - 2 k beta`, clarify
# `1 - alpha - beta`.

# %%
env = envs.make_env(clarify_config.get_config('rest').env)
rng = np.random.default_rng(0)
for alpha in (0.04, 0.54):
  episode = env.reset(rng, 'heldout', alpha=alpha, beta=0.012, name='kim')
  print(env.system_prompt(episode, 'assistant'))
  print({a: round(v, 3) for a, v in clarify.expected_rewards(episode).items()},
        '-> optimal:', clarify.optimal_actions(episode))

# %% [markdown]
# ## Configs and mesh
# `configs/rl/clarify.py`'s `sft` and `rest` stages (a SentencePiece tokenizer with digits
# split, a small Llama-style policy), with one ReST round; at `tiny` a much smaller policy,
# few demonstrations and steps. The mesh spans all devices (`data=-1`).

# %%
sft_config, rest_config = clarify_config.get_config('sft'), clarify_config.get_config('rest')
sft_config.rest.eval_sets = ()  # the ReST job evaluates its starting (SFT) policy itself
rest_config.rest.update(iterations=1, eval_sets=('heldout',), eval_modes=('sample',))
if SIZE == 'tiny':
  for config in (sft_config, rest_config):
    config.model.update(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=64)
    config.data.update(batch_size=len(devices), seq_len=64)
    config.train.update(log_every=2, tensorboard=False)
    config.rollout.update(batch=16, max_new_tokens=12)  # Grow's 16 episodes: one shape
  sft_config.sft.episodes = 200
  sft_config.train.update(steps=10, warmup_steps=2, checkpoint_every=10)
  rest_config.rest.update(prompts=8, samples_per_prompt=2, thresholds=(-9.0,),
                          steps_per_improve=2, eval_episodes=1, final_eval_episodes=1)
mesh = sharding.make_mesh(sft_config.mesh)
print('mesh', dict(mesh.shape), '| policy', dict(sft_config.model))

# %% [markdown]
# ## SFT, then one ReST round
# `rest.sft` is the `rl_sft` job: demonstrations of every action at random costs, a tokenizer
# built on their text, NLL on the assistant's and the user's turns. `rest.rest` is the `rl_rest`
# job: it evaluates the SFT policy (iteration 0), then Grow (self-play rollouts at costs drawn
# from the training grids, scored by the reward) and Improve (fine-tune on the best samples),
# and evaluates again on the held-out costs. Rerunning the cell resumes both workdirs.

# %%
root = 'workdirs/notebook_clarify' if SIZE == 'colab' else tempfile.mkdtemp()
sft_dir, rest_dir = os.path.join(root, 'sft'), os.path.join(root, 'rest')
print('SFT', rest.sft(sft_config, sft_dir))
rest_config.rest.init_workdir = sft_dir
print('ReST', rest.rest(rest_config, rest_dir))

records = metrics.read_metrics(sft_dir)
plt.plot(*zip(*[(r['step'], r['train/loss']) for r in records if 'train/loss' in r]))
plt.xlabel('SFT step')
plt.ylabel('loss (nats/token, trained turns)')
plt.show()

# %% [markdown]
# ## Steerability: action rates against the cost of a question
# The held-out evaluation plays `final_eval_episodes` episodes at every pair of held-out costs
# (alphas and betas training never draws), sampling at the rollout temperature, so a rate is the
# policy's probability of that first action. Each curve averages over the held-out betas. The
# dashed curves are the Bayes-optimal policy's rates (exact, `repro_clarify.baselines`; ties
# split evenly). At `tiny` the policy has seen a few hundred demonstrations: expect noise,
# not steering; the `colab` size is the one to read.

# %%
def rates_by_alpha(eval_file):
  path = os.path.join(rest_dir, 'eval', eval_file)
  with open(notebook.require_file(path, 'ReST evaluation')) as f:
    per_setting = json.load(f)['heldout']
  table = pd.DataFrame([dict(alpha=s['alpha'], beta=s['beta'], **summary)
                        for s, summary in per_setting])
  return table.groupby('alpha').mean(numeric_only=True)


policies = {'SFT': rates_by_alpha('iteration_0.json'),
            'after ReST': rates_by_alpha('iteration_1.json')}
alphas, betas = list(env.heldout_alphas), list(env.heldout_betas)
bayes = repro_clarify.baselines(env, alphas, betas, instances=400, seed=0)
optimal = {a: [np.mean([bayes[(alpha, b)][f'bayes_rate/{a}'] for b in betas]) for alpha in alphas]
           for a in clarify.ACTIONS}  # per action, the mean over the betas at each alpha

fig, axes = plt.subplots(1, len(policies), figsize=(12, 4), sharey=True)
for ax, (name, rates) in zip(axes, policies.items()):
  for action, color in zip(clarify.ACTIONS, ('C0', 'C1', 'C2')):
    ax.plot(rates.index, rates[f'rate/{action}'], 'o-', color=color, label=action)
    ax.plot(alphas, optimal[action], '--', color=color, label=f'{action} (Bayes-optimal)')
  ax.plot(rates.index, rates['rate/invalid'], 'x:', color='gray', label='invalid')
  ax.set(xlabel='held-out alpha (cost per question)', title=name, ylim=(-0.02, 1.02))
axes[0].set_ylabel('rate of first action')
axes[-1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1, 0.5))
plt.show()
pd.DataFrame({name: r[['reward', 'acc', 'optimal_agreement']].mean()
              for name, r in policies.items()}).T

# %% [markdown]
# ## Sample transcripts
# The first held-out evaluation episodes after ReST, from the assistant's view
# (`samples/eval_iteration_1.txt`, written by the job).

# %%
samples = notebook.require_file(os.path.join(rest_dir, 'samples', 'eval_iteration_1.txt'),
                                'ReST evaluation samples')
with open(samples) as f:
  print('\n'.join(f.read().split('\n\n')[:3]))
