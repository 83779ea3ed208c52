"""Uptraining job: convert a vanilla checkpoint to a (Relaxed) Recursive Transformer or a Block
Transformer and train it with the pretraining loop.

``config.uptrain.source`` is a workdir of ours (``config.json`` + ``checkpoints/``) or a
Hugging Face directory (``model.hf_io``). ``config.model.name`` picks the target family.

Recursive (Bae et al., arXiv:2410.20672, §3; PAPERS.md §1; ``config.model.name ==
'recursive'``): from a vanilla source the recursive model takes the source's shapes and
``config.model``'s recursion options (``num_loops``, ``sharing``, ``ln_share``,
``lora_rank(s)``, ``early_exit``, ``exit_distill``) and is initialised by
``model.conversion`` (``uptrain.initialization``, ``uptrain.stepwise``). From a recursive
source (e.g. early-exit post-training after uptraining) its parameters are loaded as they
are, with ``config.model``'s early-exit options; ``config.train.trainable`` (a regex)
freezes the rest.

Block (Ho et al., arXiv:2406.02657; ``config.model.name == 'block'``): from a vanilla source
the block model takes the source's shapes (and layer style) and ``config.model``'s block
options (``block_conversion.BLOCK_FIELDS``); ``model.block_conversion`` copies the source's
layers into the block and token decoders by ``uptrain.layer_split`` (``'partition'``, the
authors' uptraining rule: ``block_layers + token_layers`` = the source depth; ``'skip'``,
``'duplicate'``), its embedding, LM head and final norm into the token decoder, and
identity-initialises the prefix projection. Depth and width mismatches and the config checks
of ``train.check_config`` (``data.block_len == model.block_len``) raise before any compile.

Both: with ``uptrain.distill > 0`` the model also learns from the original:
``distill * KL(p_teacher || p_student)`` per target token (``losses.distillation``; the
teacher's weights are an argument of the compiled step, sharded by the teacher's own
logical axes). The block family's ``logits[:, t]`` predicts ``targets[:, t]`` as a vanilla
model's does, so teacher and student distributions are compared position by position.
"""
import dataclasses
import json
import os

import jax
import ml_collections

from model import block_conversion, conversion, hf_io
from model.layers import ModelConfig
from model.llama import Llama
from model.recursive import RecursiveConfig
from training import checkpoint as ckpt_lib
from training import losses
from training.train import check_config, train_and_evaluate

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
  if 'lora_ranks' in values:
    values['lora_ranks'] = dict(values['lora_ranks'])
  return ml_collections.ConfigDict(values)


def prepare(config):
  """(config with the converted model filled in, initial params, teacher or None), where
  teacher is ``(module, params)`` when ``uptrain.distill > 0``."""
  up = config.uptrain
  source_cfg, source_params = load_source(up.source)
  if config.model.get('name') == 'block':
    config, params = _block_from_vanilla(config, source_cfg, source_params)
    return config, params, (Llama(source_cfg), source_params) if up.get('distill', 0.0) else None
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
  return _with_model(config, cfg), params, teacher


def _block_from_vanilla(config, source_cfg, source_params):
  """(config with the block model filled in, converted params); every config check
  (``model.block_conversion.block_config``, ``train.check_config``) before any compile."""
  if type(source_cfg) is not ModelConfig:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f'config.uptrain.source={config.uptrain.source!r} is a '
                     f'{source_cfg.name!r} model; a block model is uptrained from a vanilla '
                     '(llama) one.')
  split = config.uptrain.get('layer_split', 'partition')
  fields = {k: config.model[k] for k in block_conversion.BLOCK_FIELDS if k in config.model}
  cfg = block_conversion.block_config(
      source_cfg, split, **fields, dtype=config.model.get('dtype', source_cfg.dtype),
      remat=config.model.get('remat', False),
      scan_layers=config.model.get('scan_layers', source_cfg.scan_layers))
  config = _with_model(config, cfg)
  check_config(config)
  return config, block_conversion.convert_params(source_params, source_cfg, cfg,
                                                 jax.random.PRNGKey(config.seed), split)


def _with_model(config, cfg):
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = _model_config_dict(cfg)
  return config


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
