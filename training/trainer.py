"""The trainer core: sharded state, a jitted step around any loss, checkpoints, metrics,
preemption, and runs that refuse to lose work. Pretraining, uptraining and the RL loops
are jobs on top of it: each brings an iterator of batches and a loss function.

  with Trainer(config, workdir, loss_fn=losses.lm_loss()) as trainer:
    state = trainer.restore_or_init(batches)           # latest readable checkpoint, or init
    result = trainer.fit(state, batches, until=config.train.steps, evaluate=fn)

Before step 1 the step is compiled for the devices present, with the global batch split
into micro-batches per device (``budget.plan_batch``), and XLA's memory estimate is checked
against the device's memory (``Trainer.compile``): a step that cannot fit is one ConfigError
line, not an out-of-memory error inside the first step. The loop reuses that compiled step.

Guarantees:
  * One live run per workdir (``workdir.WorkdirLock``); the saved config is checked on
    resume (``workdir.record_config``).
  * A non-finite loss or gradient norm freezes the state in the step itself (the update is
    not applied); the host notices at the next log, eval or checkpoint step, saves the last
    finite state if it is newer than the last checkpoint, and raises FloatingPointError
    naming the step. No checkpoint with non-finite values is written, so rotation never
    drops the last good one.
  * Any other exception in the loop saves the last completed step (with the data
    iterator's position after it) before re-raising, when the state's buffers are intact.
  * SIGTERM (single process) or JAX's preemption sync point (multi-host: every process
    stops at the same step) saves and returns ``preempted=True``.
Step arguments (``args``: teacher or reference parameters) are inputs of the compiled
step, placed on the mesh with ``shard_params``, never constants compiled into it.
"""
import contextlib
import dataclasses
import math
import signal
import time
from typing import Any, Callable, NamedTuple, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import optax

from model.registry import build_model
from training import budget, checkpoint as ckpt_lib
from training import losses, metrics as metrics_lib, optim, sharding
from training import workdir as workdir_lib


class StepContext(NamedTuple):
  """What a loss function sees besides the model, variables and micro-batch."""
  rng: jax.Array
  step: jax.Array
  n_tokens: jax.Array  # target tokens (loss_mask) of the whole batch, >= 1
  accum: int  # micro-batches per step
  args: Any  # the step's extra arguments (e.g. {'teacher': params})


@dataclasses.dataclass
class FitResult:
  state: dict
  step: int
  preempted: bool
  last_eval: dict  # the last evaluation's metrics, with 'eval_step'


# ---------------------------------------------------------------------------------------
# State and the step.
# ---------------------------------------------------------------------------------------
def make_init_fn(model, tx, seq_len):
  """``init(rng) -> state`` with boxed (logically partitioned) params and optimizer state,
  plus ``model_state`` when the model has variable collections other than ``params``."""
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = dict(model.init({'params': rng}, tokens))
    params = variables.pop('params')
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'rng': jax.random.fold_in(rng, 1), 'nonfinite_step': jnp.full((), -1, jnp.int32)}
    if variables:
      state['model_state'] = variables
    return state
  return init


def make_train_step(model, tx, schedule, train_config, loss_fn=None, accum=None):
  """Jittable ``step(state, batch, args=None) -> (state, metrics)``.

  The batch is split into ``accum`` micro-batches (default ``train_config.grad_accum``)
  scanned in sequence; loss functions return contributions that add up to the full batch's
  value (``losses`` module), so accumulation matches one big batch. Micro-batch ``k`` holds
  rows ``k, k + accum, ...``: each device's contiguous rows split into its own share of
  every micro-batch, so splitting moves no data between devices. A step whose loss or
  gradient norm is not finite returns the state unchanged except ``nonfinite_step``, which
  records the first such step (1-based); once set, later steps change nothing.
  """
  loss_fn = loss_fn or losses.lm_loss(train_config.get('z_loss', 0.0))
  accum = accum or train_config.get('grad_accum', 1) or 1

  def micro_grads(params, model_state, mb, ctx):
    def f(p):
      loss, metrics, new_state = loss_fn(model, {'params': p, **model_state}, mb, ctx)
      return loss, (metrics, new_state)
    (loss, (metrics, new_state)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, {'total_loss': loss, **metrics}, new_state

  def step(state, batch, args=None):
    batch = losses.scored(model, batch)
    rng = jax.random.fold_in(state['rng'], state['step'])
    n_tokens = jnp.maximum(batch['loss_mask'].sum(), 1).astype(jnp.float32)
    params, model_state = state['params'], state.get('model_state', {})
    ctx = StepContext(rng, state['step'], n_tokens, accum, args)
    if accum == 1:
      grads, metrics, model_state = micro_grads(params, model_state, batch, ctx)
    else:
      micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
      micro = jax.lax.with_sharding_constraint(micro, jax.sharding.PartitionSpec(
          None, sharding.BATCH_AXES))

      def body(g_acc, xs):
        mb, i = xs
        g, m, s = micro_grads(params, model_state, mb, ctx._replace(rng=jax.random.fold_in(rng, i)))
        return jax.tree.map(jnp.add, g_acc, g), (m, s)

      zeros = jax.tree.map(jnp.zeros_like, params)
      grads, (metrics, model_state) = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      metrics = jax.tree.map(jnp.sum, metrics)
      # Each micro-batch updated the same model_state: keep the mean of their updates.
      model_state = jax.tree.map(lambda v: v.mean(0).astype(v.dtype), model_state)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_state = dict(state, step=state['step'] + 1, opt_state=opt_state,
                     params=jax.tree.map(jnp.add, params, updates))
    if model_state:
      new_state['model_state'] = model_state
    ok = (jnp.isfinite(metrics['total_loss']) & jnp.isfinite(grad_norm)
          & (state['nonfinite_step'] < 0))
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
    new_state['nonfinite_step'] = jnp.where(
        ok | (state['nonfinite_step'] >= 0), state['nonfinite_step'], state['step'] + 1)
    metrics = {**{f'train/{k}': v for k, v in metrics.items()},
               'train/grad_norm': grad_norm, 'train/lr': schedule(state['step'])}
    return new_state, metrics

  return step


def model_variables(state):
  """The variables to apply the model with: ``params`` and the state's ``model_state``."""
  return {'params': state['params'], **state.get('model_state', {})}


def count_params(params, embedding_keys=('embedder',)):
  """(total, non-embedding) parameter counts of a (possibly abstract) param tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(math.prod(v.shape) for _, v in leaves)
  emb = sum(math.prod(v.shape) for p, v in leaves
            if any(getattr(k, 'key', None) in embedding_keys for k in p))
  return total, total - emb


def build_state_fns(config, mesh, model=None):
  """Model, optimizer, abstract state with shardings, and the sharded init function."""
  rules = sharding.rules_from_config(config)
  model = model or build_model(config.model)
  tx, schedule = optim.make_optimizer(config.train)
  init = make_init_fn(model, tx, config.data.seq_len)
  boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  init_sharded = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)
  return model, tx, schedule, abstract, shardings, init_sharded, rules


# ---------------------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------------------
class Preemption:
  """``requested(step)``: a SIGTERM arrived. With several processes JAX's preemption sync
  point answers, so that every process stops after the same step."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._flag = False
    self._previous = None

  def __enter__(self):
    if not self._multi:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._previous)

  def _handler(self, *_):
    self._flag = True

  def requested(self, step):
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag


def _safe_to_save(state):
  return not any(getattr(x, 'is_deleted', lambda: False)() for x in jax.tree.leaves(state))


# ---------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------
class Trainer:
  """Sharded state, the jitted step for ``loss_fn`` and the training loop for one workdir.

  Construction builds shapes only (no compile, no write). ``with Trainer(...)`` takes the
  workdir's lock, checks the config against the saved one, and opens the checkpoints;
  ``restore_or_init`` restores, records the config and opens the metrics.
  """

  def __init__(self, config, workdir, *, model=None, loss_fn=None, mesh=None):
    self.config, self.workdir = config, workdir_lib.path(workdir)
    self.mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    self.batch_plan = budget.plan_batch(config, self.mesh)
    (self.model, self.tx, self.schedule, self.abstract, self.shardings, self._init,
     self.rules) = build_state_fns(config, self.mesh, model)
    self._loss_fn = loss_fn
    # The jitted step for the planned micro-batch (None until ``compile`` picks one).
    self.step_fn = (self._jit(self.batch_plan.accum)
                    if self.batch_plan.micro_batch_per_device else None)
    self._compiled = {}  # (batch, args) shapes -> the compiled step
    # The last ``compile``: its report (plan, memory estimate, limit, verdict), programs.
    self.memory_report = self.lowered_step = self.compiled_step = None
    _, non_emb = count_params(self.abstract['params'])
    self.flops_per_token = (budget.analytic_flops_per_token(
        self.model.cfg, non_emb, config.data.seq_len) if hasattr(self.model, 'cfg') else None)
    self.peak_flops = budget.peak_flops(config, self.mesh.local_devices[0])
    self.checkpointer = self.writer = self._lock = None
    self.start_step = None

  # -- The compiled step and its memory plan. ----------------------------------------------
  def _jit(self, accum):
    step = make_train_step(self.model, self.tx, self.schedule, self.config.train,
                           self._loss_fn, accum=accum)
    return jax.jit(step, donate_argnums=0, out_shardings=(self.shardings, None))

  def _lower_compile(self, step_fn, batch, args):
    """(lowered, compiled, (trace-and-lower seconds, compile seconds))."""
    with self.context():
      start = time.perf_counter()
      lowered = step_fn.lower(self.abstract, batch, args)
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
    return lowered, compiled, (lowered_at - start, time.perf_counter() - lowered_at)

  def compile(self, batch, args=None, *, check=True):
    """Compiles the step for batches shaped like ``batch`` (arrays or ShapeDtypeStructs of
    the global batch) and ``args``, and checks XLA's per-device memory estimate against the
    device's memory (``budget.memory_limit``) before any step runs.

    With ``config.train.micro_batch_per_device=0`` and ``grad_accum=0`` the micro-batch is
    the largest divisor of the per-device batch whose step fits: micro-batches 1 and 2 give
    the estimate's slope, and the largest fitting divisor by that line is compiled and
    confirmed (stepping down if XLA disagrees). Raises ConfigError (one line: the estimate,
    the limit and the knobs) when nothing fits and ``check``; else returns the report
    (``self.memory_report``). The compiled step is kept and used by ``fit``.
    """
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding.batch_sharding(self.mesh)), batch)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), args)
    limit, source = budget.memory_limit(self.config, self.mesh.local_devices[0])
    tried = {}

    def attempt(micro):
      if micro not in tried:
        plan = self.batch_plan.with_micro(micro)
        step_fn = (self.step_fn if self.batch_plan.micro_batch_per_device else
                   self._jit(plan.accum))
        lowered, compiled, seconds = self._lower_compile(step_fn, batch, args)
        tried[micro] = (step_fn, compiled, budget.MemoryEstimate.of(compiled), lowered, seconds)
      estimate = tried[micro][2]
      return limit is None or estimate is None or estimate.total <= limit

    auto = self.batch_plan.micro_batch_per_device is None
    if auto and limit is None:
      raise workdir_lib.ConfigError(
          f'Cannot pick the micro-batch from memory: {source}. Set '
          'config.train.micro_batch_per_device or config.train.memory_limit_bytes.')
    candidates = self.batch_plan.candidates()
    chosen = candidates[0]
    if attempt(chosen) and auto and tried[chosen][2] is None:
      raise workdir_lib.ConfigError(
          'Cannot pick the micro-batch from memory: the backend gives no memory analysis. '
          'Set config.train.micro_batch_per_device.')
    if len(candidates) > 1 and attempt(chosen) and attempt(candidates[1]):
      chosen = candidates[1]
      first, second = tried[candidates[0]][2].total, tried[candidates[1]][2].total
      slope = max((second - first) / (candidates[1] - candidates[0]), 1.0)
      for micro in reversed(candidates[2:]):
        if first + slope * (micro - candidates[0]) <= limit and attempt(micro):
          chosen = micro
          break
    if auto and jax.process_count() > 1:  # every process must run the same program
      chosen = int(multihost_utils.process_allgather(jnp.asarray(chosen)).min())
    fits = attempt(chosen)
    step_fn, compiled, estimate, self.lowered_step, seconds = tried[chosen]
    plan = self.batch_plan.with_micro(chosen)
    self.memory_report = {
        'batch': plan.describe(self.mesh), 'micro_batch_per_device': chosen,
        'accum': plan.accum, 'estimate_bytes': estimate and estimate.total,
        'limit_bytes': limit, 'limit_source': source, 'fits': fits,
        'verdict': budget.memory_verdict(estimate, limit, source),
        'estimates': {m: e[2].total for m, e in tried.items() if e[2] is not None},
        'compiles': len(tried), 'trace_and_lower_seconds': round(seconds[0], 2),
        'compile_seconds': round(seconds[1], 2)}
    if not fits and check:
      smallest = (f'even the smallest micro-batch ({chosen} per device) '
                  if self.batch_plan.micro_batch_per_device is None else '')
      raise workdir_lib.ConfigError(
          f'The train step does not fit in device memory: {smallest}{plan.describe(self.mesh)} '
          f'needs {estimate.describe()} but the limit is {budget.format_bytes(limit)} '
          f'({source}). Lower the memory with {budget.knobs(self.config, plan)}.')
    self.batch_plan, self.step_fn, self.compiled_step = plan, step_fn, compiled
    self._compiled[_signature(batch, args)] = compiled
    if jax.process_index() == 0:
      print(f'Plan: {plan.describe(self.mesh)}; {self.memory_report["verdict"]}', flush=True)
    return self.memory_report

  def _step_for(self, batch, args):
    """The compiled step for this batch's and args' shapes (compiled and checked once)."""
    key = _signature(batch, args)
    if key not in self._compiled:
      self.compile(batch, args)
    return self._compiled[key]

  # -- Opening and closing. --------------------------------------------------------------
  def __enter__(self):
    self._lock = workdir_lib.WorkdirLock(self.workdir).acquire()
    try:
      self.checkpointer = ckpt_lib.Checkpointer(
          self.workdir, keep=self.config.train.get('keep_checkpoints', 3),
          async_save=self.config.train.get('async_checkpointing', True), create=False)
      workdir_lib.record_config(self.workdir, self.config, self.checkpointer.latest_step() or 0,
                                write=False)
    except BaseException:
      self.__exit__()
      raise
    return self

  def __exit__(self, *exc):
    for closer in (self.checkpointer, self.writer):  # closing waits for pending saves
      if closer is not None:
        closer.close()
    self.checkpointer = self.writer = None
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical-axis rules every call on this trainer's arrays runs under."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  # -- State. ------------------------------------------------------------------------------
  def restore_or_init(self, batches=None, init_params=None):
    """The latest readable checkpoint (restoring ``batches``' position too), or a fresh
    state from ``config.seed`` with ``init_params`` (shape-checked) if given."""
    with self.context():
      found = self.checkpointer.restore_latest_readable(
          self.abstract, with_data=hasattr(batches, 'set_state'))
      if found is not None:
        step, state, data_state = found
        if data_state is not None:
          batches.set_state(data_state)
        logging.info('Resumed from step %d in %s', step, self.checkpointer.directory)
      else:
        state = self._fresh_state(init_params)
    self.start_step = int(state['step'])
    workdir_lib.record_config(self.workdir, self.config, self.start_step)
    self.writer = metrics_lib.MetricWriter(
        self.workdir, tensorboard=self.config.train.get('tensorboard', True),
        resume_step=self.start_step if found is not None else None)
    return state

  def _fresh_state(self, init_params):
    """The state from ``config.seed``; with ``init_params``, its random parameters and their
    optimizer state are not computed at all (XLA drops the unused part of the init: a smaller
    program to compile and run) and ``with_params`` puts the given ones in."""
    rng = jax.random.PRNGKey(self.config.seed)
    if init_params is None:
      return self._init(rng)
    replaced = ('params', 'opt_state')
    rest = jax.jit(lambda r: {k: v for k, v in self._init(r).items() if k not in replaced},
                   out_shardings={k: s for k, s in self.shardings.items() if k not in replaced})
    return self.with_params(rest(rng), init_params)

  def shard_params(self, params, model=None):
    """``params`` placed on the mesh by ``model``'s logical axes (default: the policy's),
    e.g. a teacher's or a reference policy's parameters passed as step arguments."""
    if model is None:
      return jax.device_put(params, self.shardings['params'])
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                           jnp.zeros((1, self.config.data.seq_len), jnp.int32))['params']
    return jax.device_put(params, sharding.tree_shardings(boxed, self.mesh, self.rules))

  def with_params(self, state, params):
    """``state`` with the given parameters (shape-checked) and a fresh optimizer state."""
    got, want = ckpt_lib.flat_shapes(params), ckpt_lib.flat_shapes(self.abstract['params'])
    problems = [f'{k}: given {got.get(k)} vs model {want.get(k)}'
                for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    if problems:
      raise ValueError(f'init_params do not match the configured model ({len(problems)} '
                       'parameter(s) differ): ' + '; '.join(problems[:5]))
    params = self.shard_params(jax.tree.map(jnp.asarray, params))
    opt_state = jax.jit(self.tx.init, out_shardings=self.shardings['opt_state'])(params)
    return dict(state, params=params, opt_state=opt_state)

  # -- The loop. ---------------------------------------------------------------------------
  def fit(self, state, batches, until, *, args=None,
          evaluate: Optional[Callable[[dict], dict]] = None) -> FitResult:
    """Steps ``state`` on ``batches`` until step ``until``, the batches run out, or a
    preemption; evaluates (``evaluate(state) -> {'eval/...': value}``), logs and saves
    on the ``config.train`` cadence, and saves the step it stops at. See the module
    docstring for failures."""
    train_cfg = self.config.train
    step = int(state['step'])
    eval_step, last_eval = self.writer.last('eval/')
    last_eval = {**last_eval, 'eval_step': eval_step} if last_eval else {}
    data_after = {}  # completed step -> the iterator's state after its batch
    progress = _progress_bar(step, until)
    shown = step  # the bar counts completed steps: it advances where the host waits for one
    t0, window_start, tokens = None, step, 0
    with Preemption() as preemption, self.context():
      try:
        if evaluate is not None and step == 0 and train_cfg.get('eval_every', 0):
          last_eval = self._evaluate(evaluate, state, 0)
        while step < until:
          try:
            batch = next(batches)
          except StopIteration:
            logging.warning('The batches ran out at step %d (of %d).', step, until)
            if self.checkpointer.latest_step() != step:
              self._check_finite(state, data_after)
              self.checkpointer.save(step, state, data_after.get(step))
            break
          batch = sharding.shard_batch(batch, self.mesh)
          step_fn = self._step_for(batch, args)
          if t0 is None:  # timing starts once the step is compiled
            t0 = time.time()
          state, metrics = step_fn(state, batch, args)
          step += 1
          tokens += batch['tokens'].size
          data_after[step] = batches.get_state() if hasattr(batches, 'get_state') else None
          log = step % train_cfg.log_every == 0 or step == until
          evaluate_now = evaluate is not None and train_cfg.get('eval_every', 0) and (
              step % train_cfg.eval_every == 0 or step == until)
          save = step % train_cfg.checkpoint_every == 0 or step == until
          stop = preemption.requested(step)
          if log or evaluate_now or save or stop:
            self._check_finite(state, data_after)  # waits for this step to complete
            data_after = {step: data_after.get(step)}
            progress.update(step - shown)
            shown = step
          if log:
            speed = self._speed(tokens, step - window_start, time.time() - t0)
            metrics = {**jax.device_get(metrics), **speed}
            self.writer.write(step, metrics)
            postfix = {'loss': f"{metrics.get('train/loss', float('nan')):.3f}",
                       'tok/s': f"{speed['train/tokens_per_s']:,.0f}"}
            if 'train/mfu' in speed:
              postfix['mfu'] = f"{100 * speed['train/mfu']:.1f}%"
            progress.set_postfix(postfix)
          if evaluate_now:
            last_eval = self._evaluate(evaluate, state, step)
          if save or stop:
            if self.checkpointer.latest_step() != step:
              self.checkpointer.save(step, state, data_after.get(step), force=stop)
          if stop:
            logging.warning('Preempted (SIGTERM): saved step %d and stopping.', step)
            return FitResult(state, step, True, last_eval)
          if log or evaluate_now:
            t0, window_start, tokens = time.time(), step, 0
      except FloatingPointError:
        raise
      except BaseException:
        self._save_after_crash(state, step, data_after.get(step))
        raise
      finally:
        progress.close()
        self.checkpointer.wait()
    return FitResult(state, step, False, last_eval)

  def _speed(self, tokens, steps, seconds):
    """Throughput of the last window: tokens/s, step time, MFU (analytic FLOPs per token x
    tokens/s over the mesh's peak FLOP/s, when the device's peak is known) and the device's
    peak memory in use (where the backend reports it)."""
    seconds = max(seconds, 1e-9)
    out = {'train/tokens_per_s': tokens / seconds, 'train/steps_per_s': steps / seconds,
           'train/step_time_s': seconds / max(steps, 1)}
    if self.flops_per_token and self.peak_flops:
      out['train/mfu'] = (self.flops_per_token * out['train/tokens_per_s']
                          / (self.peak_flops * self.mesh.size))
    try:
      peak = (self.mesh.local_devices[0].memory_stats() or {}).get('peak_bytes_in_use')
    except Exception:  # pylint: disable=broad-except  # backends without memory stats
      peak = None
    if peak is not None:
      out['train/peak_bytes_in_use'] = float(peak)
    return out

  def _evaluate(self, evaluate, state, step):
    result = dict(evaluate(state))
    self.writer.write(step, result)
    logging.info('step %d: %s', step, result)
    return {**result, 'eval_step': step}

  def _check_finite(self, state, data_after):
    bad = int(state['nonfinite_step'])
    if bad < 0:
      return
    good = bad - 1  # the frozen state is the one after step bad - 1
    latest = self.checkpointer.latest_step()
    if good > 0 and (latest is None or good > latest) and good in data_after:
      self.checkpointer.save(good, state, data_after[good], force=True)
      self.checkpointer.wait()
      saved = f'the last finite state (step {good}) is saved'
    else:
      saved = f'the last checkpoint (step {latest}) is kept'
    raise FloatingPointError(
        f'Non-finite loss or gradient norm at step {bad} (config.train.learning_rate='
        f'{self.config.train.learning_rate}); training stopped and {saved}. Lower the '
        'learning rate or check the data, then resume.')

  def _save_after_crash(self, state, step, data_state):
    """Saves the last completed step after an exception, when that is safe."""
    try:
      if (step == self.start_step or not _safe_to_save(state)
          or int(state['nonfinite_step']) >= 0 or self.checkpointer.latest_step() == step):
        return
      logging.warning('Saving step %d before re-raising the error.', step)
      self.checkpointer.save(step, state, data_state, force=True)
      self.checkpointer.wait()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Could not save step %d after the error: %s', step, e)


def _signature(batch, args):
  leaves, treedef = jax.tree.flatten((batch, args))
  return treedef, tuple((x.shape, jax.numpy.dtype(x.dtype)) for x in leaves)


def _progress_bar(initial, total):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, desc='train', unit='step',
              disable=jax.process_index() != 0, dynamic_ncols=True)
