"""Process advantage verifiers: progress under a prover (Setlur et al., arXiv:2410.08146).

A step's process reward is its *progress*: the change in the prover mu's probability of
success before and after the step, i.e. mu's advantage (Sec. 3)
  A^mu(s_h, a_h) = Q^mu(s_h, a_h) - Q^mu(s_{h-1}, a_{h-1}),
and RL maximises per step the effective reward (Sec. 3)
  Q^pi(s_h, a_h) + alpha * A^mu(s_h, a_h).
The prover class analysed in Sec. 3 is Best-of-K of a base policy: its success probability
from a state where the base policy succeeds with probability q is 1 - (1 - q)^K.

Pure jnp functions on arrays whose last axis is the step; the same functions serve the toy
(``rl.envs.planted``, exact Q^mu) and a learned verifier's predictions.

On text (steps are lines, ``rl.envs.arith``; Sec. 4.1): ``mc_labels`` (Monte Carlo Q^pi of
step prefixes, first pit), ``PolicySampler`` (batched generate from prefixes),
``Verifier`` (a ``WithValueHead`` read at each step's last token), ``verifier_loss``
(class-balanced soft cross-entropy) and the job ``pav_verifier`` (``train_verifier``).
"""
import copy

import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np

from model import decode
from rl import episodes as ep
from rl.envs import base


def best_of_k_q(q, k):
  """Success probability of Best-of-K from a state where one sample succeeds with
  probability ``q``: ``1 - (1 - q)^k``. ``k`` >= 1 (real k interpolates)."""
  if k < 1:
    raise ValueError(f'k={k} must be >= 1.')
  return 1.0 - jnp.power(1.0 - jnp.asarray(q, jnp.float32), k)


def step_advantages(q_mu):
  """Per-step prover advantages A_h = Q_h - Q_{h-1}.

  Args:
    q_mu: [..., H + 1]: ``q_mu[..., 0]`` is the prover's value of the state before the first
      step (the empty prefix, Q_{-1}); ``q_mu[..., h + 1]`` is Q^mu(s_h, a_h), the prover's
      success probability after step h.

  Returns:
    [..., H]; they telescope: ``sum_h A_h = q_mu[..., -1] - q_mu[..., 0]``.
  """
  q_mu = jnp.asarray(q_mu, jnp.float32)
  if q_mu.ndim < 1 or q_mu.shape[-1] < 2:
    raise ValueError(f'q_mu has shape {q_mu.shape}; expected [..., H + 1] with H >= 1 (the '
                     'value before the first step, then one Q per step).')
  return q_mu[..., 1:] - q_mu[..., :-1]


def effective_rewards(q_pi, a_mu, alpha):
  """Per-step effective reward ``q_pi + alpha * a_mu``, [..., H].

  ``q_pi`` is the policy's own per-step estimate (the paper's Q^pi; in a policy gradient
  typically the Monte Carlo return minus a baseline); [..., H], or [...] (one value per
  sequence, broadcast over the steps). ``a_mu`` [..., H] from ``step_advantages``.
  ``alpha`` >= 0 (0 is outcome-only RL).
  """
  if alpha < 0:
    raise ValueError(f'alpha={alpha} must be >= 0.')
  q_pi = jnp.asarray(q_pi, jnp.float32)
  a_mu = jnp.asarray(a_mu, jnp.float32)
  if q_pi.shape == a_mu.shape[:-1]:
    q_pi = q_pi[..., None]
  elif q_pi.shape != a_mu.shape:
    raise ValueError(f'q_pi has shape {q_pi.shape}; expected a_mu\'s shape {a_mu.shape} or '
                     f'{a_mu.shape[:-1]} (one value per sequence).')
  return q_pi + alpha * a_mu


def step_ends(targets, loss_mask, newline_id):
  """[B, T] bool: the policy tokens (``loss_mask``) that end a step: a newline, and each
  row's last policy token (end of turn, or the cut-off point of a truncated turn)."""
  mask = jnp.asarray(loss_mask).astype(bool)
  t = mask.shape[-1]
  last = jnp.max(jnp.where(mask, jnp.arange(t), -1), axis=-1, keepdims=True)
  return mask & ((jnp.asarray(targets) == newline_id) | (jnp.arange(t) == last))


def step_token_returns(step_rewards, ends, loss_mask):
  """Per-token returns [B, T] from per-step rewards [B, H] placed on each step's last token
  (``ends``, from ``step_ends``): every policy token of step h gets step h's reward.

  With ``step_rewards = effective_rewards(R, A^mu, alpha)`` (R the outcome, the Monte Carlo
  estimate of Q^pi(s_h, a_h) under a terminal reward) this is the per-step weight of the
  paper's policy gradient with the effective reward:
  sum_h grad log pi(a_h | s_h) (Q^pi(s_h, a_h) + alpha A^mu(s_h, a_h)).
  The process term is not summed over later steps: its reward-to-go would telescope to
  alpha (Q^mu_H - Q^mu(s_{h-1})), which leaves no per-step credit. A row with more steps
  than rewards reuses its last reward (the padded advantage is 0). 0 outside the mask.
  """
  ends = jnp.asarray(ends).astype(jnp.int32)
  step_rewards = jnp.asarray(step_rewards, jnp.float32)
  index = jnp.clip(jnp.cumsum(ends, axis=-1) - ends, 0, step_rewards.shape[-1] - 1)
  returns = jnp.take_along_axis(step_rewards, index, axis=-1)
  return jnp.where(jnp.asarray(loss_mask).astype(bool), returns, 0.0)


# ---------------------------------------------------------------------------------------
# Monte Carlo labels (Sec. 4.1): Q^pi of step prefixes by rolling the policy out from them.
# ---------------------------------------------------------------------------------------
def first_pit(step_values, eps=0.0) -> int:
  """How many steps first-pit sampling labels: up to and including the first *pit*, the
  first step h (1-based) whose Monte Carlo value Q(s_h, a_h) is <= ``eps`` (with n_mc
  rollouts and ``eps=0``: none of them succeeded). Every later step of the rollout is
  labelled by nobody: past a pit the policy has (nearly) lost, their values are ~0 too and
  only add cost and a flood of 0 labels. Returns len(step_values) when there is no pit."""
  for h, value in enumerate(step_values, start=1):
    if value <= eps:
      return h
  return len(step_values)


def mc_labels(complete, rollouts, n_mc, pit_eps=0.0) -> list:
  """Monte Carlo estimates of Q^pi at every step prefix of each rollout, first pit only.

  Args:
    complete: ``complete(requests) -> rewards``: for each request ``(problem, prefix)``
      (``prefix`` a list of step strings, possibly empty) one completion sampled from the
      policy after the prefix, scored 0/1 by the task; one batched call per round.
    rollouts: ``[(problem, steps, reward)]``: the seed rollouts (``n_cov`` per problem),
      their steps and outcomes.
    n_mc: completions per prefix (>= 1).
    pit_eps: a step whose estimate is <= this is a pit (``first_pit``).

  Returns:
    Per rollout a float array [1 + kept]: entry 0 estimates Q of the empty prefix (the
    problem's solve rate, Q_{-1} of ``step_advantages``), entry h the value after step h,
    for the steps up to the first pit. After the last step the value is the rollout's own
    outcome (nothing is left to sample). Round h samples prefix h of every rollout still
    alive, so a pit stops that rollout's sampling.
  """
  if n_mc < 1:
    raise ValueError(f'n_mc={n_mc} must be >= 1.')
  if pit_eps < 0:
    raise ValueError(f'pit_eps={pit_eps} must be >= 0.')
  values = [[] for _ in rollouts]
  alive = list(range(len(rollouts)))
  h = 0
  while alive:
    sampled = [i for i in alive if h < len(rollouts[i][1])]
    requests = [(rollouts[i][0], list(rollouts[i][1][:h])) for i in sampled for _ in range(n_mc)]
    rewards = np.asarray(complete(requests), np.float64).reshape(len(sampled), n_mc) \
        if sampled else np.zeros((0, n_mc))
    rates = dict(zip(sampled, rewards.mean(1)))
    next_alive = []
    for i in alive:
      problem, steps, reward = rollouts[i]
      values[i].append(float(rates[i]) if i in rates else float(reward))
      if h < len(steps) and (h == 0 or values[i][-1] > pit_eps):
        next_alive.append(i)
    alive, h = next_alive, h + 1
  return [np.asarray(v, np.float32) for v in values]


def class_balanced_weights(labels, threshold=0.5):
  """Per-example weights giving the examples with label < ``threshold`` and those with
  label >= ``threshold`` equal total weight, normalised to mean 1 (all 1 when a class is
  empty)."""
  labels = np.asarray(labels, np.float64)
  high = labels >= threshold
  n, n_high = labels.size, int(high.sum())
  if n_high in (0, n):
    return np.ones_like(labels, np.float32)
  return np.where(high, n / (2 * n_high), n / (2 * (n - n_high))).astype(np.float32)


def soft_cross_entropy(logits, labels):
  """Binary cross-entropy of sigmoid(``logits``) against soft ``labels`` in [0, 1]."""
  logits = jnp.asarray(logits, jnp.float32)
  return (jax.nn.softplus(logits) - jnp.asarray(labels, jnp.float32) * logits)


def verifier_loss():
  """Trainer loss of a ``rl.value.WithValueHead`` verifier: at every labelled position
  (``loss_mask``) the soft cross-entropy of sigmoid(value) against ``value_labels``,
  weighted by ``value_weights`` (class-balanced, mean 1 over the data set), summed over
  the batch's labelled positions / their count. Metrics: ``loss``, ``mae`` (unweighted
  |sigmoid(value) - label|)."""
  from training import losses as train_losses  # pylint: disable=g-import-not-at-top

  def loss_fn(model, variables, batch, ctx):
    _, aux, model_state = train_losses.apply_model(model, variables, batch, ctx)
    mask = batch['loss_mask'].astype(jnp.float32)
    ce = soft_cross_entropy(aux['values'], batch['value_labels'])
    loss = jnp.sum(ce * batch['value_weights'] * mask) / ctx.n_tokens
    mae = jnp.sum(jnp.abs(jax.nn.sigmoid(aux['values']) - batch['value_labels']) * mask)
    return loss, {'loss': loss, 'mae': mae / ctx.n_tokens}, model_state
  return loss_fn


# ---------------------------------------------------------------------------------------
# The policy and the verifier on step sequences (host side; batched jit calls).
# ---------------------------------------------------------------------------------------
STOPS = ('newline', 'end', 'limit')  # how a sampled piece ended


class PolicySampler:
  """The policy continuing a problem after a prefix of steps (``env`` has one assistant
  turn, e.g. ``rl.envs.arith``): batched, KV-cached ``model.decode.generate``."""

  def __init__(self, env, model, variables, formatter, sampling, max_new_tokens=80,
               max_step_tokens=24, batch=512):
    newline = formatter.tokenizer.encode('\n')
    if len(newline) != 1:
      raise ValueError(f'The {formatter.tokenizer.kind} tokenizer spells a newline as '
                       f'{newline}; step search needs it to be one token (use the byte '
                       'tokenizer).')
    self.env, self.model, self.variables, self.formatter = env, model, variables, formatter
    self.sampling, self.batch = sampling, batch
    self.max_new_tokens, self.max_step_tokens = max_new_tokens, max_step_tokens
    self.newline_id = newline[0]

  def context(self, problem, prefix) -> list:
    """Token ids of the problem's prompt and the steps of ``prefix``, each + newline."""
    ids = self.formatter.context(self.env.view(problem, 'assistant'), 'assistant')
    return ids + self.formatter.tokenizer.encode(''.join(s + '\n' for s in prefix))

  def sample(self, requests, rng, one_step: bool) -> list:
    """One continuation per ``(problem, prefix)``: the next step only (``one_step``: stop
    at a newline or end of turn, at most ``max_step_tokens``) or the rest of the solution
    (at most ``max_new_tokens``). Returns ``(text, tokens generated, stop)`` with stop in
    ``STOPS``; the text leaves out the stop token."""
    limit = self.max_step_tokens if one_step else self.max_new_tokens
    stops = (self.newline_id, self.formatter.end_id) if one_step else (self.formatter.end_id,)
    out = []
    for start in range(0, len(requests), self.batch):
      chunk = requests[start:start + self.batch]
      prompts, lengths = ep.pad_rows([self.context(p, prefix) for p, prefix in chunk],
                                     self.formatter.tokenizer.pad_id, 32)
      gen = decode.generate(self.model, self.variables, prompts, limit, self.sampling,
                            jax.random.fold_in(rng, start), stop_tokens=stops,
                            pad_id=self.formatter.tokenizer.pad_id, prompt_lengths=lengths)
      tokens, counts = jax.device_get((gen.tokens, gen.lengths))
      for i in range(len(chunk)):
        count = int(counts[i])
        last = int(tokens[i, count - 1]) if count else -1
        stop = ('end' if last == self.formatter.end_id else
                'newline' if last == self.newline_id and one_step else 'limit')
        body = tokens[i, :count - (stop != 'limit')].tolist()
        out.append((self.formatter.tokenizer.decode(body), count, stop))
    return out

  def reward(self, problem, text, ended) -> float:
    """The environment's reward for ``text`` as the whole assistant turn."""
    episode = copy.copy(problem)
    episode.turns = list(problem.turns) + [base.Turn('assistant', text, ended=ended)]
    episode.done, episode.info = False, {}
    self.env.step(episode)
    return float(episode.reward)

  def complete(self, requests, rng) -> list:
    """``mc_labels``' ``complete``: the 0/1 reward of one sampled completion each."""
    out = self.sample(requests, rng, one_step=False)
    return [self.reward(p, '\n'.join(list(prefix) + [text]), stop == 'end')
            for (p, prefix), (text, _, stop) in zip(requests, out)]


def state_sequence(sampler, problem, steps, finished):
  """(token ids, state positions) of a prefix for the verifier: the prompt, then the steps
  each ended by a newline, the last by end of turn when ``finished``. State 0 is the
  assistant's role token (the empty prefix), state h the token ending step h: the
  verifier's value there is its Q(s_h, a_h)."""
  ids = sampler.formatter.context(sampler.env.view(problem, 'assistant'), 'assistant')
  positions = [len(ids) - 1]
  encode = sampler.formatter.tokenizer.encode
  for h, step in enumerate(steps):
    last = finished and h == len(steps) - 1
    ids = ids + encode(step) + [sampler.formatter.end_id if last else sampler.newline_id]
    positions.append(len(ids) - 1)
  return ids, positions


class Verifier:
  """A ``WithValueHead`` model read as a verifier: sigmoid(value) at each state."""

  def __init__(self, model, variables, sampler, batch=512):
    self.model, self.variables, self.sampler, self.batch = model, variables, sampler, batch
    self._values = jax.jit(lambda v, t, p, s: jax.nn.sigmoid(
        model.apply(v, t, positions=p, segment_ids=s)[1]['values']))

  def values(self, candidates) -> list:
    """Per ``(problem, steps, finished)`` a float array [1 + len(steps)]: the predicted
    Q at the empty prefix and after each step."""
    out = []
    for start in range(0, len(candidates), self.batch):
      seqs = [state_sequence(self.sampler, *c) for c in candidates[start:start + self.batch]]
      tokens, lengths = ep.pad_rows([ids for ids, _ in seqs],
                                    self.sampler.formatter.tokenizer.pad_id, 32)
      width = tokens.shape[1]
      positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
      segments = (positions < lengths[:, None]).astype(np.int32)
      values = np.asarray(self._values(self.variables, tokens, positions, segments))
      out += [values[i, pos] for i, (_, pos) in enumerate(seqs)]
    return out


# ---------------------------------------------------------------------------------------
# Job ``pav_verifier``: Monte Carlo labels from a policy workdir, then a verifier.
# ---------------------------------------------------------------------------------------
KINDS = ('pav', 'orm')


def default_verifier_config() -> config_dict.ConfigDict:
  return config_dict.ConfigDict(dict(
      policy_workdir='',  # the policy (job rl_sft): its tokenizer, model and checkpoint
      kind='pav',  # 'pav': per-step MC labels of Q^pi; 'orm': the outcome at the last step
      labels_file='',  # shared Monte Carlo labels (default: <workdir>/labels.json)
      problems=256,  # training problems
      n_cov=4,  # seed rollouts per problem
      n_mc=8,  # completions per step prefix
      pit_eps=0.0,  # first pit: the first step whose MC value is <= pit_eps
      max_new_tokens=80,
      max_step_tokens=24,
      temperature=1.0,
      batch=512,  # rows per generate / verifier call
  ))


def check_verifier_config(config):
  """Bad ``config.verifier`` fields -> ValueError naming them, before any loading."""
  cfg = config.verifier
  if not cfg.policy_workdir:
    raise ValueError('config.verifier.policy_workdir is empty: name the policy workdir '
                     '(job rl_sft).')
  if cfg.kind not in KINDS:
    raise ValueError(f'config.verifier.kind={cfg.kind!r} must be one of {KINDS}.')
  for field in ('problems', 'n_cov', 'n_mc', 'batch'):
    if cfg[field] < 1:
      raise ValueError(f'config.verifier.{field}={cfg[field]} must be >= 1.')
  if cfg.pit_eps < 0:
    raise ValueError(f'config.verifier.pit_eps={cfg.pit_eps} must be >= 0.')


def check_matches_policy(config, tokenizer, policy_config):
  """The verifier starts from the policy and reads its tokens: ``config.model.vocab_size``
  and ``config.tokenizer`` (kind, reserved tokens) must be the policy's -> ValueError
  naming the field, before any compile."""
  vocab = policy_config['model']['vocab_size']
  if config.model.vocab_size != vocab or config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f'config.model.vocab_size={config.model.vocab_size} does not match the '
                     f'policy (vocab_size {vocab}, tokenizer {tokenizer.vocab_size} ids); the '
                     'verifier starts from the policy and reads its tokens.')
  mine = (config.tokenizer.kind, tuple(config.tokenizer.get('reserved_tokens', ())))
  theirs = (tokenizer.kind, tuple(tokenizer.reserved_tokens))
  if mine != theirs:
    raise ValueError(f'config.tokenizer (kind, reserved_tokens)={mine} does not match the '
                     f"policy's tokenizer {theirs}.")


def problems_for(env, seed, n, split='train'):
  """The ``n`` labelled problems: problem i from ``default_rng([seed, 3, i])``."""
  return [env.reset(np.random.default_rng([seed, 3, i]), split) for i in range(n)]


def make_labels(sampler, problems, cfg, seed):
  """Seed rollouts and first-pit MC labels -> a JSON-able dict (``rollouts``: problem
  index, steps, reward, ended, mc values)."""
  rng = jax.random.PRNGKey(seed)
  requests = [(p, []) for p in problems for _ in range(cfg.n_cov)]
  owners = [i for i in range(len(problems)) for _ in range(cfg.n_cov)]
  seeds = sampler.sample(requests, jax.random.fold_in(rng, 0), one_step=False)
  rollouts = []
  for (p, _), i, (text, _, stop) in zip(requests, owners, seeds):
    rollouts.append(dict(problem=i, steps=text.split('\n'), ended=stop == 'end',
                         reward=sampler.reward(p, text, stop == 'end')))
  counter = iter(range(1, 1 << 30))
  complete = lambda reqs: sampler.complete(reqs, jax.random.fold_in(rng, next(counter)))
  mc = mc_labels(complete, [(problems[r['problem']], r['steps'], r['reward'])
                            for r in rollouts], cfg.n_mc, cfg.pit_eps)
  for r, v in zip(rollouts, mc):
    r['mc'] = v.tolist()
  return dict(n_cov=cfg.n_cov, n_mc=cfg.n_mc, pit_eps=cfg.pit_eps, rollouts=rollouts)


def verifier_arrays(sampler, problems, labels, kind, seq_len):
  """Training arrays: one row per seed rollout; ``pav`` labels the states up to the first
  pit with the MC values, ``orm`` only the final state with the outcome. Class-balanced
  weights over the whole set."""
  rows, targets = [], []
  for r in labels['rollouts']:
    ids, positions = state_sequence(sampler, problems[r['problem']], r['steps'], True)
    if len(ids) > seq_len:
      continue
    pairs = (list(zip(positions, r['mc'])) if kind == 'pav'
             else [(positions[-1], r['reward'])])
    rows.append(ids)
    targets.append(pairs)
  n = len(rows)
  if not n:
    raise ValueError(f'No labelled rollout fits config.data.seq_len={seq_len}.')
  flat = np.asarray([y for pairs in targets for _, y in pairs])
  weights = iter(class_balanced_weights(flat))
  batch = dict(tokens=np.zeros((n, seq_len), np.int32), targets=np.zeros((n, seq_len), np.int32),
               positions=np.tile(np.arange(seq_len, dtype=np.int32), (n, 1)),
               segment_ids=np.zeros((n, seq_len), np.int32),
               loss_mask=np.zeros((n, seq_len), np.int32),
               value_labels=np.zeros((n, seq_len), np.float32),
               value_weights=np.zeros((n, seq_len), np.float32))
  for i, (ids, pairs) in enumerate(zip(rows, targets)):
    batch['tokens'][i, :len(ids)] = ids
    batch['targets'][i, :len(ids) - 1] = ids[1:]
    batch['segment_ids'][i, :len(ids)] = 1
    for pos, y in pairs:
      batch['loss_mask'][i, pos] = 1
      batch['value_labels'][i, pos] = y
      batch['value_weights'][i, pos] = next(weights)
  return batch


def load_policy(policy_workdir):
  """(tokenizer, saved config, model, variables) of a policy workdir."""
  from training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from training import tokenizers  # pylint: disable=g-import-not-at-top
  from training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  root = workdir_lib.path(policy_workdir)
  tokenizer = tokenizers.load_tokenizer(root / tokenizers.TOKENIZER_SUBDIR)
  saved = workdir_lib.read_config(policy_workdir)
  model, variables = ckpt_lib.load_model(policy_workdir)
  return tokenizer, saved, model, variables


def train_verifier(config, workdir):
  """Job ``pav_verifier``: labels (``labels_file``, made if missing) from the policy in
  ``config.verifier.policy_workdir``, then ``config.train.steps`` of ``verifier_loss`` on
  a ``WithValueHead`` initialised from the policy (head at zero: every Q starts at 0.5)."""
  import json  # pylint: disable=g-import-not-at-top
  from rl import envs  # pylint: disable=g-import-not-at-top
  from rl import value as value_lib  # pylint: disable=g-import-not-at-top
  from training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  cfg = config.verifier
  check_verifier_config(config)
  tokenizer, saved, policy, policy_vars = load_policy(cfg.policy_workdir)
  check_matches_policy(config, tokenizer, saved)
  env = envs.make_env(config.env)
  formatter = ep.Formatter(tokenizer, env.roles)
  sampler = PolicySampler(env, policy, policy_vars, formatter,
                          decode.SamplingConfig(temperature=cfg.temperature),
                          cfg.max_new_tokens, cfg.max_step_tokens, cfg.batch)
  problems = problems_for(env, config.seed, cfg.problems)
  root = workdir_lib.path(workdir)
  labels_file = workdir_lib.path(cfg.labels_file) if cfg.labels_file else root / 'labels.json'
  if not labels_file.exists():
    labels = make_labels(sampler, problems, cfg, config.seed)
    if workdir_lib.is_primary():
      labels_file.parent.mkdir(parents=True, exist_ok=True)
      workdir_lib.write_text(labels_file, json.dumps(labels))
  labels = json.loads(labels_file.read_text())
  arrays = verifier_arrays(sampler, problems, labels, cfg.kind, config.data.seq_len)
  model = value_lib.WithValueHead(policy)
  trainer = trainer_lib.Trainer(config, workdir, model=model, loss_fn=verifier_loss())
  head = {'kernel': np.zeros((config.model.embed_dim, 1), np.float32),
          'bias': np.zeros((1,), np.float32)}
  with trainer:
    state = trainer.restore_or_init(
        init_params=value_lib.wrap_params(policy_vars['params'], head))
    batches = ep.epoch_batches(arrays, config.data.batch_size, config.seed,
                               start=int(state['step']))
    result = trainer.fit(state, batches, config.train.steps)
  rollouts = labels['rollouts']
  summary = dict(step=result.step, preempted=result.preempted, rows=len(arrays['tokens']),
                 labels=int(arrays['loss_mask'].sum()),
                 seed_accuracy=float(np.mean([r['reward'] for r in rollouts])),
                 mean_labelled_steps=float(np.mean([len(r['mc']) - 1 for r in rollouts])),
                 mean_steps=float(np.mean([len(r['steps']) for r in rollouts])))
  if workdir_lib.is_primary():
    workdir_lib.write_text(root / 'summary.json', json.dumps(summary, indent=1))
  return summary
