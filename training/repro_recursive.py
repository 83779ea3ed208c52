"""Miniature reproduction of Relaxed Recursive Transformers (arXiv:2410.20672, Figs. 3-6).

Pretrain a ``repro.layers``-layer vanilla model on pycorpus; convert it to
``layers/2`` shared layers x 2 loops with every initialisation and uptrain each for the same
steps; relaxed variants (average init, per-loop norms, SVD-initialised LoRA) at the ranks
``repro.lora_ranks``; a ``layers/2``-layer vanilla from scratch on the same step budget;
early-exit post-training (aggressive CE + self-distillation) of the stepwise model. Writes
``results.json``, ``results.md`` (validation loss per model and per exit) and
``results.png`` into the workdir.
"""
import json
import os

import jax
import ml_collections
import numpy as np

from model.registry import build_model
from training import data as data_lib, losses, tokenizers
from training.train import train_and_evaluate
from training.uptrain import load_source, uptrain


def _sub(config, **updates):
  sub = ml_collections.ConfigDict(config.to_dict())
  for key, value in updates.items():
    node, *path = key.split('.')
    target = sub if not path else sub[node]
    target[path[-1] if path else node] = value
  return sub


def exit_losses(config, workdir):
  """Validation CE of every loop's exit of the recursive model trained in ``workdir``."""
  cfg, params = load_source(workdir)
  model = build_model(ml_collections.ConfigDict({**cfg.__dict__,
                                                 'lora_ranks': dict(cfg.lora_ranks)}))
  tokenizer = tokenizers.make_tokenizer(config.tokenizer, workdir=workdir)
  val = data_lib.make_dataset(config.data, tokenizer, 'validation', seed=config.seed)
  apply = jax.jit(lambda p, b: model.apply({'params': p}, b['tokens'], positions=b['positions'],
                                           segment_ids=b['segment_ids'], return_exits=True))
  sums, count = 0.0, 0.0
  for i, batch in enumerate(val):
    if i >= config.train.eval_batches:
      break
    _, aux = apply(params, batch)
    sums = sums + np.array([float(losses.cross_entropy_sums(lg, batch['targets'],
                                                            batch['loss_mask'])[0])
                            for lg in aux['exit_logits']])
    count += float(batch['loss_mask'].sum())
  return (sums / max(count, 1.0)).tolist()


def run(config, workdir):
  """The ``repro_relaxed_recursive`` job."""
  r = config.repro
  half = r.layers // 2
  results = {}
  vanilla_dir = os.path.join(workdir, 'vanilla')
  vanilla = _sub(config, **{'model.num_layers': r.layers, 'train.steps': r.pretrain_steps})
  results['vanilla_full'] = train_and_evaluate(vanilla, vanilla_dir)['eval/loss']
  scratch = _sub(config, **{'model.num_layers': half, 'train.steps': r.uptrain_steps})
  results['vanilla_half_scratch'] = train_and_evaluate(
      scratch, os.path.join(workdir, 'scratch'))['eval/loss']

  def up(name, **updates):
    base = {'job': 'uptrain', 'model.name': 'recursive', 'train.steps': r.uptrain_steps}
    sub = _sub(config, **base)
    sub.model.update(dict(num_loops=2, sharing='cycle', ln_share=True, lora_rank=0,
                          lora_ranks={}, early_exit='none', exit_distill=0.0))
    sub.uptrain = ml_collections.ConfigDict(dict(source=vanilla_dir, initialization='stepwise',
                                                 stepwise='ends', distill=0.0))
    for key, value in updates.items():
      node, leaf = key.split('.')
      sub[node][leaf] = value
    results[name] = uptrain(sub, os.path.join(workdir, name))['eval/loss']
    return sub

  for init in r.initializations:
    up(f'recursive_{init}', **{'uptrain.initialization': init})
  for rank in r.lora_ranks:
    up(f'relaxed_average_r{rank}', **{'uptrain.initialization': 'average',
                                      'model.lora_rank': rank, 'model.ln_share': False})
  before = exit_losses(config, os.path.join(workdir, 'recursive_stepwise'))
  post = up('early_exit_post', **{'uptrain.source': os.path.join(workdir, 'recursive_stepwise'),
                                  'model.early_exit': 'aggressive', 'model.exit_distill': 1.0,
                                  'train.steps': r.post_steps,
                                  'train.learning_rate': r.post_learning_rate})
  after = exit_losses(post, os.path.join(workdir, 'early_exit_post'))
  report = {'eval_loss': results, 'exits_before_post_training': before,
            'exits_after_post_training': after}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(report, f, indent=2)
  lines = ['| model | validation loss |', '|---|---|']
  lines += [f'| {k} | {v:.4f} |' for k, v in results.items()]
  lines += ['', '| exit (loop) | before post-training | after post-training |', '|---|---|---|']
  lines += [f'| {i + 1} | {b:.4f} | {a:.4f} |' for i, (b, a) in enumerate(zip(before, after))]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.barh(list(results), list(results.values()))
  ax.set_xlabel('validation loss (nats/token)')
  ax.set_xlim(min(results.values()) * 0.95, max(results.values()) * 1.02)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'results.png'))
  print('\n'.join(lines))
  return report
