"""Uptraining job: convert a vanilla checkpoint to a (Relaxed) Recursive Transformer and train
it with the pretraining loop (Bae et al., arXiv:2410.20672, §3; PAPERS.md §1).

``config.uptrain.source`` is a workdir of ours (``config.json`` + ``checkpoints/``) or a
Hugging Face Llama/SmolLM directory (``model.hf_io``). From a vanilla source the recursive
model takes the source's shapes and ``config.model``'s recursion options (``num_loops``,
``sharing``, ``ln_share``, ``lora_rank(s)``, ``early_exit``, ``exit_distill``), is
initialised by ``model.conversion`` (``uptrain.initialization``, ``uptrain.stepwise``)
and, with ``uptrain.distill > 0``, also learns from the original model:
``distill * KL(p_teacher || p_student)`` per target token (``losses.distillation``; the
teacher's weights are an argument of the compiled step, sharded by the teacher's own
logical axes). From a recursive source (e.g. early-exit post-training after
uptraining) its parameters are loaded as they are, with ``config.model``'s early-exit
options; ``config.train.trainable`` (a regex) freezes the rest.
"""
import dataclasses
import json
import os

import jax
import ml_collections

from model import conversion, hf_io
from model.llama import Llama
from model.recursive import RecursiveConfig
from training import checkpoint as ckpt_lib
from training import losses
from training.train import train_and_evaluate

RECURSION_FIELDS = ('num_loops', 'sharing', 'ln_share', 'lora_rank', 'lora_ranks', 'early_exit',
                    'exit_distill')
EXIT_FIELDS = ('early_exit', 'exit_distill')


def load_source(source):
  """(model config, float32 params) of an HF directory or a workdir of ours (latest step)."""
  if os.path.isfile(os.path.join(source, 'config.json')):
    with open(os.path.join(source, 'config.json')) as f:
      if 'model_type' in json.load(f):
        return hf_io.import_hf_checkpoint(source)
  try:
    model, variables = ckpt_lib.load_model(source)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'config.uptrain.source: {e}') from e
  return model.cfg, variables['params']


def _model_config_dict(cfg):
  values = dataclasses.asdict(cfg)
  values['lora_ranks'] = dict(values['lora_ranks'])
  return ml_collections.ConfigDict(values)


def prepare(config):
  """(config with the recursive model filled in, initial params, teacher or None), where
  teacher is ``(module, params)`` when ``uptrain.distill > 0``."""
  up = config.uptrain
  source_cfg, source_params = load_source(up.source)
  options = {k: config.model[k] for k in RECURSION_FIELDS if k in config.model}
  teacher = None
  if isinstance(source_cfg, RecursiveConfig):
    cfg = dataclasses.replace(source_cfg, **{k: options[k] for k in EXIT_FIELDS if k in options})
    params = source_params
  else:
    options['lora_ranks'] = dict(options.get('lora_ranks', {}))
    cfg = conversion.recursive_config(
        source_cfg, options.pop('num_loops'), options.pop('sharing'),
        **options, dtype=config.model.get('dtype', source_cfg.dtype),
        remat=config.model.get('remat', False))
    params = conversion.convert_params(source_params, source_cfg, cfg, up.initialization,
                                       up.get('stepwise', 'ends'), jax.random.PRNGKey(config.seed))
    if up.get('distill', 0.0):
      teacher = (Llama(source_cfg), source_params)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = _model_config_dict(cfg)
  return config, params, teacher


def uptrain(config, workdir):
  """The ``uptrain`` job: convert ``config.uptrain.source`` and train (resumes in ``workdir``)."""
  config, params, teacher = prepare(config)
  if teacher is None:
    return train_and_evaluate(config, workdir, init_params=params)
  module, teacher_params = teacher
  loss_fn = losses.lm_loss(config.train.get('z_loss', 0.0),
                           extra=losses.distillation(module, config.uptrain.distill))
  return train_and_evaluate(
      config, workdir, init_params=params, loss_fn=loss_fn,
      step_args=lambda trainer: {'teacher': trainer.shard_params(teacher_params, module)})
