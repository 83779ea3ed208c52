"""The pretraining job on top of the trainer core (``training.trainer``).

Sections: config checks, data, the trainer (mesh, model, optimizer, sharded state,
restore), evaluation, the loop, the end-of-run summary. Every model family returns
``(logits, aux)`` with ``aux['losses']`` holding already-scaled auxiliary losses; the
default loss (``losses.lm_loss``) adds them to the LM loss and logs them, so no family
needs a trainer of its own. Variable collections other than ``params`` (e.g. MoR's
``router_state``) live in the state's ``model_state``: a training step applies the model
with them mutable and keeps what it returns; evaluation reads them. A family whose module
has ``eval_variants()`` (name -> module) is also evaluated under each variant (e.g. MoR
expert choice under causal routing, as decoding routes), logged as ``eval/loss_<name>``.
"""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from training import data as data_lib
from training import losses, sharding, tokenizers
from training import trainer as trainer_lib
from training import workdir as workdir_lib
from training.trainer import count_params, model_variables


# ---------------------------------------------------------------------------------------
# Config checks (before any compile or any write to the workdir).
# ---------------------------------------------------------------------------------------
def check_config(config, tokenizer=None):
  """Raises ConfigError naming the field for inconsistent settings."""
  train, data = config.train, config.data
  problems = []
  if train.steps <= 0:
    problems.append(f'config.train.steps must be positive, got {train.steps}.')
  if not train.learning_rate >= 0:  # also rejects NaN
    problems.append(f'config.train.learning_rate must be >= 0, got {train.learning_rate}.')
  for field in ('seq_len', 'batch_size'):
    if data[field] <= 0:
      problems.append(f'config.data.{field} must be positive, got {data[field]}.')
  accum = train.get('grad_accum', 1)
  if accum < 0 or (accum and data.batch_size > 0 and data.batch_size % accum):
    problems.append(f'config.data.batch_size={data.batch_size} is not divisible by '
                    f'config.train.grad_accum={accum} (0: derived from the devices).')
  for field in ('micro_batch_per_device', 'memory_limit_bytes', 'peak_flops_per_device'):
    if train.get(field, 0) < 0:
      problems.append(f'config.train.{field} must be >= 0 (0: automatic), got {train[field]}.')
  for field in ('log_every', 'checkpoint_every'):
    if train[field] <= 0:
      problems.append(f'config.train.{field} must be positive, got {train[field]}.')
  if config.model.get('name') == 'block' and data.get('block_len', 0) != config.model.get(
      'block_len', 4):
    problems.append(f"config.data.block_len={data.get('block_len', 0)} must equal "
                    f"config.model.block_len={config.model.get('block_len', 4)}: the block "
                    'family needs block-aligned packing, so no block straddles two documents.')
  if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    problems.append(f'config.model.vocab_size={config.model.vocab_size} is smaller than the '
                    f'tokenizer vocabulary ({tokenizer.vocab_size}).')
  if problems:
    raise workdir_lib.ConfigError(' '.join(problems))


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------
def make_eval_step(model):
  """``eval_step(variables, batch) -> {name: (ce_sum, count)}``: the model's loss, and its
  loss under each of ``model.eval_variants()`` (if the family has any)."""
  models = {'': model, **{f'_{k}': v for k, v in getattr(model, 'eval_variants', dict)().items()}}

  def eval_step(variables, batch):
    out = {}
    batch = losses.scored(model, batch)
    for name, m in models.items():
      logits, _ = m.apply(variables, batch['tokens'], positions=batch['positions'],
                          segment_ids=batch['segment_ids'])
      ce, _, count = losses.cross_entropy_sums(logits, batch['targets'], batch['loss_mask'])
      out[name] = (ce, count)
    return out
  return eval_step


def evaluate(eval_step, variables, val_ds, mesh, num_batches):
  """Validation loss over the first ``num_batches`` batches of the (deterministic) split."""
  totals = {}
  for i, batch in enumerate(val_ds):
    if i >= num_batches:
      break
    for name, (ce, count) in eval_step(variables, sharding.shard_batch(batch, mesh)).items():
      ce_total, count_total = totals.get(name, (0.0, 0.0))
      totals[name] = (ce_total + float(ce), count_total + float(count))
  result = {}
  for name, (ce, count) in totals.items():
    result[f'eval/loss{name}'] = ce / max(count, 1.0)
  loss = result.get('eval/loss', float('nan'))
  return {**result, 'eval/perplexity': math.exp(min(loss, 50.0)),
          'eval/tokens': totals.get('', (0.0, 0.0))[1]}


# ---------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------
def lm_batch_spec(config):
  """Shapes of the pretraining batch (``training.data``'s rows): the global batch."""
  shape = (config.data.batch_size, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32)
          for k in ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')}


def make_validation(config, tokenizer, batch_size, process_index, process_count):
  """The validation split in batches of ``batch_size`` sequences. With evaluation on, a
  split too small for one batch is an error here, not a NaN loss after the first step."""
  data = config.data.copy_and_resolve_references()
  data.batch_size = batch_size
  val_ds = data_lib.make_dataset(data, tokenizer, 'validation', process_index, process_count,
                                 seed=config.seed)
  if config.train.eval_every and next(iter(val_ds), None) is None:
    raise workdir_lib.ConfigError(
        f'The validation split of data.source={config.data.source!r} holds fewer than one '
        f'evaluation batch ({batch_size} sequences of {config.data.seq_len} tokens). Add '
        f'validation documents, lower data.batch_size, or set train.eval_every=0.')
  return val_ds


def dry_run(config):
  """Compiles the train step ahead of time for the configured mesh, as a run would (the
  same batch plan and memory check, ``Trainer.compile``); prints its costs and the memory
  verdict. Writes nothing (the trainer's workdir is never opened)."""
  trainer = trainer_lib.Trainer(config, 'dry_run')
  plan = trainer.compile(lm_batch_spec(config), check=False)
  b, t = config.data.batch_size, config.data.seq_len
  mesh, compiled = trainer.mesh, trainer.compiled_step
  total, non_emb = count_params(trainer.abstract['params'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  mem = compiled.memory_analysis()
  report = {
      'params_total': total, 'params_non_embedding': non_emb,
      'mesh': dict(mesh.shape), 'devices': mesh.size, 'tokens_per_step': b * t,
      'micro_batch_per_device': plan['micro_batch_per_device'], 'grad_accum': plan['accum'],
      # XLA's cost analysis counts a loop body once: with scanned layers or gradient
      # accumulation this is a lower bound. The analytic count is 6N + 12·L·H·D·T (PaLM).
      'flops_per_token_xla_cost_analysis': flops * mesh.size / (b * t),
      'flops_per_token_analytic': trainer.flops_per_token,
      'trace_and_lower_seconds': plan['trace_and_lower_seconds'],
      'compile_seconds': plan['compile_seconds'], 'compiles': plan['compiles'],
      # Program size: lines of the StableHLO handed to XLA (grows with unrolled layers).
      'stablehlo_lines': trainer.lowered_step.as_text().count('\n'),
      'memory_per_device_bytes': {
          'arguments': getattr(mem, 'argument_size_in_bytes', None),
          'outputs': getattr(mem, 'output_size_in_bytes', None),
          'temporaries': getattr(mem, 'temp_size_in_bytes', None),
          'aliased': getattr(mem, 'alias_size_in_bytes', None),
          'generated_code': getattr(mem, 'generated_code_size_in_bytes', None),
          'estimate': plan['estimate_bytes'], 'limit': plan['limit_bytes']},
      'memory_fits': plan['fits'],
  }
  print(json.dumps(report, indent=2))
  print(f'Parameters: {total / 1e6:.2f}M total, {non_emb / 1e6:.2f}M non-embedding')
  print(f'Memory verdict: {plan["verdict"]}')
  return report


def train_and_evaluate(config, workdir, init_params=None, loss_fn=None, step_args=None):
  """Pretrains ``config.model`` on ``config.data``; resumes from ``workdir`` if possible.

  ``init_params`` (a parameter tree of the model's shapes, e.g. a converted checkpoint)
  replaces the random initialisation of a fresh run. ``loss_fn`` (default: the trainer's,
  ``losses.lm_loss`` with ``train.z_loss``) and ``step_args(trainer) -> args`` (e.g. a teacher's parameters,
  placed with ``trainer.shard_params``) go to the trainer core.
  """
  if config.get('dry_run', False):
    return dry_run(config)

  # -- Tokenizer, data and config checks: fail before compiling or writing anything. ----
  check_config(config)
  tokenizer = tokenizers.make_tokenizer(
      config.tokenizer, workdir=workdir, save=False,
      texts=data_lib.document_texts(config.data, seed=config.seed))
  check_config(config, tokenizer)
  pi, pc = jax.process_index(), jax.process_count()
  train_ds = data_lib.make_dataset(config.data, tokenizer, 'train', pi, pc, seed=config.seed)
  data_lib.check_has_tokens(config.data, tokenizer, 'train', pi, pc)

  # -- The trainer: mesh, model, optimizer, abstract sharded state (no compile yet). -----
  trainer = trainer_lib.Trainer(config, workdir, loss_fn=loss_fn)
  total, non_emb = count_params(trainer.abstract['params'])
  logging.info('Model %s: %.2fM parameters (%.2fM non-embedding), mesh %s', config.model.name,
               total / 1e6, non_emb / 1e6, dict(trainer.mesh.shape))
  args = step_args(trainer) if step_args else None
  # The memory plan: compile the step and check it fits (or pick the micro-batch) before
  # any state is initialised or anything written; ``fit`` reuses this compiled step.
  trainer.compile(lm_batch_spec(config), args)
  # Evaluation runs the step's micro-batches (one pass over a whole global batch may not
  # fit): ``eval_batches`` global batches are ``eval_batches * accum`` of them.
  train_cfg = config.train
  accum = trainer.batch_plan.accum
  val_ds = make_validation(config, tokenizer, config.data.batch_size // accum, pi, pc)
  eval_step = jax.jit(make_eval_step(trainer.model))
  run_eval = lambda state: evaluate(eval_step, model_variables(state), val_ds, trainer.mesh,
                                    train_cfg.eval_batches * accum)

  # -- Lock, config record, restore or initialise, the loop. -----------------------------
  train_iter = iter(train_ds)
  with trainer:
    state = trainer.restore_or_init(train_iter, init_params)
    tokenizer_dir = trainer.workdir / tokenizers.TOKENIZER_SUBDIR
    if workdir_lib.is_primary() and not (tokenizer_dir / tokenizers.MARKER_FILE).exists():
      tokenizer.save(tokenizer_dir)
    if trainer.start_step >= train_cfg.steps:  # Nothing to train: re-evaluate only.
      with trainer.context():
        result = trainer_lib.FitResult(state, trainer.start_step, False,
                                       {**run_eval(state), 'eval_step': trainer.start_step}
                                       if train_cfg.eval_every else {})
    else:
      result = trainer.fit(state, train_iter, train_cfg.steps, args=args, evaluate=run_eval)

  # -- Summary (process 0 writes it); a preempted run skips the end-of-run extras. -------
  tokens_per_step = config.data.batch_size * config.data.seq_len
  summary = {'step': result.step, 'tokens_seen': result.step * tokens_per_step,
             'preempted': result.preempted, **result.last_eval,
             'plan': {k: v for k, v in trainer.memory_report.items() if k != 'verdict'}}
  if not result.preempted:
    if train_cfg.get('report_unigram_entropy', False):
      summary['validation_unigram_entropy'] = data_lib.unigram_entropy(
          config.data, tokenizer, 'validation', max_tokens=200_000)
    if config.get('sample') and config.sample.max_new_tokens > 0:
      summary['sample'] = sample_text(trainer.model, jax.device_get(model_variables(
          result.state)), tokenizer, config.sample, config.seed)
  workdir_lib.write_text(trainer.workdir / 'summary.json', json.dumps(summary, indent=2))
  if workdir_lib.is_primary():
    print('Summary: ' + json.dumps(summary))
  return {**summary, 'state': result.state}


def sample_text(model, variables, tokenizer, sample_config, seed):
  """Continues ``sample_config.prompt`` with the trained model (``model.decode.generate``)."""
  from model import decode
  prompt = [tokenizer.bos_id] + tokenizer.encode(sample_config.prompt)
  sampling = decode.SamplingConfig.from_config(sample_config)
  out = decode.generate(model, variables, np.asarray([prompt], np.int32),
                        sample_config.max_new_tokens, sampling, jax.random.PRNGKey(seed),
                        stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  text = sample_config.prompt + tokenizer.decode(np.asarray(out.tokens[0]).tolist())
  logging.info('Sample:\n%s', text)
  return text
