"""The pretraining loop: one linear function a researcher can fork.

Sections: config checks, mesh, data, model and optimizer, sharded init, step functions,
restore, loop. Every model family returns ``(logits, aux)`` with ``aux['losses']``
holding already-scaled auxiliary losses; they are added to the LM loss and logged, so no
family needs a trainer of its own. Training calls also get ``step`` (the 0-based training
step). Variable collections other than ``params`` (e.g. MoR's ``router_state``) live in
the state's ``model_state``: a training step applies the model with them mutable and keeps
what it returns; evaluation reads them.
"""
import json
import math
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from model.registry import build_model
from training import checkpoint as ckpt_lib
from training import data as data_lib
from training import losses, metrics as metrics_lib, optim, sharding, tokenizers


# ---------------------------------------------------------------------------------------
# Config checks (before any compile or any write to the workdir).
# ---------------------------------------------------------------------------------------
def check_config(config, tokenizer=None):
  """Raises ValueError naming the field for inconsistent settings."""
  train, data = config.train, config.data
  if train.steps <= 0:
    raise ValueError(f'config.train.steps must be positive, got {train.steps}.')
  accum = train.get('grad_accum', 1)
  if data.batch_size % accum:
    raise ValueError(f'config.data.batch_size={data.batch_size} is not divisible by '
                     f'config.train.grad_accum={accum}.')
  if tokenizer is not None and tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} is smaller than the '
                     f'tokenizer vocabulary ({tokenizer.vocab_size}).')


def check_mesh(config, mesh):
  """The (micro-)batch must split evenly over the mesh's batch axes."""
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  micro = config.data.batch_size // config.train.get('grad_accum', 1)
  if micro % shards:
    raise ValueError(f'config.data.batch_size={config.data.batch_size} (per micro-batch '
                     f'{micro}) does not split over the {shards} devices of the mesh axes '
                     f'{sharding.BATCH_AXES} ({dict(mesh.shape)}); use a multiple of {shards}.')


def count_params(params, embedding_keys=('embedder',)):
  """(total, non-embedding) parameter counts of a (possibly abstract) param tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(math.prod(v.shape) for _, v in leaves)
  emb = sum(math.prod(v.shape) for p, v in leaves
            if any(getattr(k, 'key', None) in embedding_keys for k in p))
  return total, total - emb


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


# ---------------------------------------------------------------------------------------
# State and step functions.
# ---------------------------------------------------------------------------------------
def make_init_fn(model, tx, seq_len):
  """``init(rng) -> state`` with boxed (logically partitioned) params and optimizer state,
  plus ``model_state`` when the model has variable collections other than ``params``."""
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = dict(model.init({'params': rng}, tokens))
    params = variables.pop('params')
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'rng': jax.random.fold_in(rng, 1)}
    if variables:
      state['model_state'] = variables
    return state
  return init


def make_train_step(model, tx, schedule, train_config, extra_losses=None):
  """Jittable ``step(state, batch) -> (state, metrics)`` with gradient accumulation.

  The batch is split into ``grad_accum`` micro-batches scanned in sequence; the LM loss is
  the mean over all the batch's target tokens, so accumulation matches one big batch.
  ``extra_losses(micro_batch, logits) -> {name: scaled loss}`` (e.g. distillation from a
  teacher) is added to the model's auxiliary losses.
  """
  accum = train_config.get('grad_accum', 1)
  z_loss = train_config.get('z_loss', 0.0)

  def loss_fn(params, model_state, mb, rng, n_tokens, step):
    out = model.apply({'params': params, **model_state}, mb['tokens'], positions=mb['positions'],
                      segment_ids=mb['segment_ids'], train=True, targets=mb['targets'],
                      loss_mask=mb['loss_mask'], step=step, rngs={'dropout': rng},
                      mutable=list(model_state) if model_state else False)
    (logits, aux), model_state = out if model_state else (out, model_state)
    ce, z, _ = losses.cross_entropy_sums(logits, mb['targets'], mb['loss_mask'], z_loss)
    aux_losses = {**aux.get('losses', {}), **(extra_losses(mb, logits) if extra_losses else {})}
    loss = (ce + z) / n_tokens + sum(aux_losses.values(), 0.0) / accum
    parts = {'ce_sum': ce, 'z_sum': z, **{f'aux/{k}': v for k, v in aux_losses.items()}}
    return loss, (parts, model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    n_tokens = jnp.maximum(batch['loss_mask'].sum(), 1).astype(jnp.float32)
    params, model_state = state['params'], state.get('model_state', {})
    if accum == 1:
      (_, (parts, model_state)), grads = grad_fn(params, model_state, batch, rng, n_tokens,
                                                 state['step'])
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)
      micro = jax.lax.with_sharding_constraint(micro, P(None, sharding.BATCH_AXES))

      def body(g_acc, xs):
        mb, i = xs
        (_, out), g = grad_fn(params, model_state, mb, jax.random.fold_in(rng, i), n_tokens,
                              state['step'])
        return jax.tree.map(jnp.add, g_acc, g), out

      zeros = jax.tree.map(jnp.zeros_like, state['params'])
      grads, (parts, model_state) = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      parts = {k: (v.sum() if k.endswith('_sum') else v.mean()) for k, v in parts.items()}
      # Each micro-batch updated the same model_state: keep the mean of their updates.
      model_state = jax.tree.map(lambda v: v.mean(0).astype(v.dtype), model_state)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = jax.tree.map(jnp.add, state['params'], updates)
    metrics = {'train/loss': parts.pop('ce_sum') / n_tokens,
               'train/z_loss': parts.pop('z_sum') / n_tokens,
               'train/grad_norm': jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                               for g in jax.tree.leaves(grads))),
               'train/lr': schedule(state['step']), **{f'train/{k}': v for k, v in parts.items()}}
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    if model_state:
      new_state['model_state'] = model_state
    return new_state, metrics

  return step


def make_eval_step(model):
  """``eval_step(variables, batch) -> (ce_sum, count)``; variables: see ``model_variables``."""
  def eval_step(variables, batch):
    logits, _ = model.apply(variables, batch['tokens'], positions=batch['positions'],
                            segment_ids=batch['segment_ids'])
    ce, _, count = losses.cross_entropy_sums(logits, batch['targets'], batch['loss_mask'])
    return ce, count
  return eval_step


def model_variables(state):
  """The variables to apply the model with: ``params`` and the state's ``model_state``."""
  return {'params': state['params'], **state.get('model_state', {})}


def evaluate(eval_step, variables, val_ds, mesh, num_batches):
  """Validation loss over the first ``num_batches`` batches of the (deterministic) split."""
  ce_total, count_total = 0.0, 0.0
  for i, batch in enumerate(val_ds):
    if i >= num_batches:
      break
    ce, count = eval_step(variables, sharding.shard_batch(batch, mesh))
    ce_total += float(ce)
    count_total += float(count)
  loss = ce_total / max(count_total, 1.0)
  return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0)),
          'eval/tokens': count_total}


# ---------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------
def build_state_fns(config, mesh):
  """Model, optimizer, abstract state with shardings, and the sharded init function."""
  rules = sharding.rules_from_config(config)
  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config.train)
  init = make_init_fn(model, tx, config.data.seq_len)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  init_sharded = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)
  return model, tx, schedule, abstract, shardings, init_sharded, rules


def dry_run(config):
  """Compiles the train step ahead of time for the configured mesh; prints its costs."""
  mesh = sharding.make_mesh(config.mesh)
  check_mesh(config, mesh)
  model, tx, schedule, abstract, shardings, _, rules = build_state_fns(config, mesh)
  b, t = config.data.batch_size, config.data.seq_len
  batch_spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
  abstract_batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_spec)
                    for k in ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')}
  step = make_train_step(model, tx, schedule, config.train)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None)).lower(
        abstract, abstract_batch).compile()
  total, non_emb = count_params(abstract['params'])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  mem = compiled.memory_analysis()
  report = {
      'params_total': total, 'params_non_embedding': non_emb,
      'mesh': dict(mesh.shape), 'devices': mesh.size, 'tokens_per_step': b * t,
      # XLA's cost analysis counts a loop body once: with scanned layers or gradient
      # accumulation this is a lower bound. The analytic count is 6N + 12·L·H·D·T (PaLM).
      'flops_per_token_xla_cost_analysis': flops * mesh.size / (b * t),
      'flops_per_token_analytic': analytic_flops_per_token(model.cfg, non_emb, t),
      'memory_per_device_bytes': {
          'arguments': getattr(mem, 'argument_size_in_bytes', None),
          'outputs': getattr(mem, 'output_size_in_bytes', None),
          'temporaries': getattr(mem, 'temp_size_in_bytes', None),
          'generated_code': getattr(mem, 'generated_code_size_in_bytes', None)},
  }
  print(json.dumps(report, indent=2))
  print(f'Parameters: {total / 1e6:.2f}M total, {non_emb / 1e6:.2f}M non-embedding')
  return report


def train_and_evaluate(config, workdir, init_params=None, extra_losses=None):
  """Pretrains ``config.model`` on ``config.data``; resumes from ``workdir`` if possible.

  ``init_params`` (a parameter tree of the model's shapes, e.g. a converted checkpoint)
  replaces the random initialisation of a fresh run; ``extra_losses`` goes to
  ``make_train_step``.
  """
  if config.get('dry_run', False):
    return dry_run(config)

  # -- Tokenizer, data and config checks: fail before compiling or writing anything. ----
  tokenizer = tokenizers.make_tokenizer(
      config.tokenizer, workdir=workdir,
      texts=data_lib.document_texts(config.data, seed=config.seed))
  check_config(config, tokenizer)
  pi, pc = jax.process_index(), jax.process_count()
  train_ds = data_lib.make_dataset(config.data, tokenizer, 'train', pi, pc, seed=config.seed)
  val_ds = data_lib.make_dataset(config.data, tokenizer, 'validation', pi, pc, seed=config.seed)

  # -- Mesh, model, optimizer, abstract sharded state. ------------------------------------
  mesh = sharding.make_mesh(config.mesh)
  check_mesh(config, mesh)
  model, tx, schedule, abstract, shardings, init_sharded, rules = build_state_fns(config, mesh)
  total, non_emb = count_params(abstract['params'])
  logging.info('Model %s: %.2fM parameters (%.2fM non-embedding), mesh %s', config.model.name,
               total / 1e6, non_emb / 1e6, dict(mesh.shape))

  # -- Restore (shape check first) or initialise. ----------------------------------------
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.get('keep_checkpoints', 3),
                                       async_save=config.train.get('async_checkpointing', True))
  train_iter = iter(train_ds)
  latest = checkpointer.latest_step()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if latest is not None:
      state = checkpointer.restore(latest, abstract, train_iter)
      logging.info('Resumed from step %d in %s', latest, checkpointer.directory)
    else:
      state = init_sharded(jax.random.PRNGKey(config.seed))
      if init_params is not None:
        state = _with_params(state, init_params, abstract, shardings, tx)
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    with open(config_path, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  tokenizer.save(os.path.join(workdir, 'tokenizer'))

  # -- Step functions. --------------------------------------------------------------------
  train_step = jax.jit(make_train_step(model, tx, schedule, config.train, extra_losses),
                       donate_argnums=0,
                       out_shardings=(shardings, None))
  eval_step = jax.jit(make_eval_step(model))

  # -- Loop. ------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.train.get('tensorboard', True))
  stop = {'sigterm': False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
  steps, train_cfg = config.train.steps, config.train
  tokens_per_step = config.data.batch_size * config.data.seq_len
  step = int(state['step'])
  progress = _progress_bar(step, steps)
  last_eval = {}
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if (step == 0 or step >= steps) and train_cfg.eval_every:  # Start, or nothing to do.
        last_eval = evaluate(eval_step, model_variables(state), val_ds, mesh,
                           train_cfg.eval_batches)
        writer.write(0, {**last_eval, 'tokens_seen': 0})
      t0, window_start = time.time(), step
      while step < steps:
        batch = sharding.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if step % train_cfg.log_every == 0 or step == steps:
          metrics = jax.device_get(metrics)
          elapsed = time.time() - t0
          tok_s = (step - window_start) * tokens_per_step / max(elapsed, 1e-9)
          writer.write(step, {**metrics, 'train/tokens_per_s': tok_s,
                              'tokens_seen': step * tokens_per_step})
          progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f'{tok_s:,.0f}')
          t0, window_start = time.time(), step
        progress.update(1)
        if train_cfg.eval_every and (step % train_cfg.eval_every == 0 or step == steps):
          last_eval = evaluate(eval_step, model_variables(state), val_ds, mesh,
                           train_cfg.eval_batches)
          writer.write(step, {**last_eval, 'tokens_seen': step * tokens_per_step})
          logging.info('step %d: %s', step, last_eval)
          t0, window_start = time.time(), step
        if step % train_cfg.checkpoint_every == 0 or step == steps:
          checkpointer.save(step, state, train_iter)
        if stop['sigterm']:
          logging.warning('SIGTERM: saving step %d and exiting.', step)
          if checkpointer.latest_step() != step:
            checkpointer.save(step, state, train_iter, force=True)
          break
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  summary = {'step': step, 'tokens_seen': step * tokens_per_step, **last_eval}
  if train_cfg.get('report_unigram_entropy', False):
    summary['validation_unigram_entropy'] = data_lib.unigram_entropy(
        config.data, tokenizer, 'validation', max_tokens=200_000)
  if config.get('sample') and config.sample.max_new_tokens > 0:
    summary['sample'] = sample_text(model, jax.device_get(model_variables(state)), tokenizer,
                                    config.sample, config.seed)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    print('Summary: ' + json.dumps(summary))
  return {**summary, 'state': state}


def sample_text(model, variables, tokenizer, sample_config, seed):
  """Continues ``sample_config.prompt`` with the trained model (``model.decode.generate``)."""
  from model import decode
  prompt = [tokenizer.bos_id] + tokenizer.encode(sample_config.prompt)
  sampling = decode.SamplingConfig(temperature=sample_config.temperature,
                                   top_k=sample_config.top_k, greedy=sample_config.greedy)
  out = decode.generate(model, variables, np.asarray([prompt], np.int32),
                        sample_config.max_new_tokens, sampling, jax.random.PRNGKey(seed),
                        stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id)
  text = sample_config.prompt + tokenizer.decode(np.asarray(out.tokens[0]).tolist())
  logging.info('Sample:\n%s', text)
  return text


def _with_params(state, params, abstract, shardings, tx):
  """``state`` with the given parameters (shape-checked) and a fresh optimizer state."""
  got, want = ckpt_lib.flat_shapes(params), ckpt_lib.flat_shapes(abstract['params'])
  problems = [f'{k}: given {got.get(k)} vs model {want.get(k)}'
              for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
  if problems:
    raise ValueError(f'init_params do not match the configured model ({len(problems)} '
                     'parameter(s) differ): ' + '; '.join(problems[:5]))
  params = jax.device_put(jax.tree.map(jnp.asarray, params), shardings['params'])
  opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)
  return dict(state, params=params, opt_state=opt_state)


def _progress_bar(initial, total):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc='train', unit='step',
              disable=jax.process_index() != 0, dynamic_ncols=True)
