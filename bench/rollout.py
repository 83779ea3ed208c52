"""Batched multi-turn rollout throughput: ``rl.episodes.rollout`` with the KV-cached sampler
against the same rollouts regenerating every token without a cache.

  python bench/rollout.py [--policy_workdir=DIR] [--episodes=256] [--rounds=2] [--out=F.json]

The policy is the clarify SFT policy in ``--policy_workdir`` (job ``rl_sft``); without one, a
short SFT run (``--sft_steps``) trains it into a temporary directory first, so that episodes
have their real multi-turn shape (questions, self-play user replies, answers). Both modes
play the same episodes with the same keys, the policy also playing the user (self-play):

* ``cached``: ``model.decode.generate`` (one batched prefill, then one KV-cached step per
  token, inside one jit-compiled loop);
* ``no_cache``: the same jit-compiled loop, but every step re-runs the full forward pass over
  the turn's whole buffer (prompt + tokens so far, fixed size, padding masked).

Each mode is compiled by a warm-up rollout, then timed alternately ``rounds`` times; each
keeps its best round. Reports episodes/s, generated tokens/s and the cached/no-cache ratio.
"""
import argparse
import functools
import json
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.rl import clarify as clarify_config
from model import decode
from rl import episodes as ep
from rl import rest
from rl.envs import make_env
from training import checkpoint as ckpt_lib
from training import tokenizers


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling',
                                             'stop_tokens', 'pad_id'))
def _no_cache(model, params, prompts, prompt_lengths, rng, max_new_tokens, sampling,
              stop_tokens, pad_id):
  batch, prompt_len = prompts.shape
  size = prompt_len + max_new_tokens
  variables = params if 'params' in params else {'params': params}
  buf = jnp.full((batch, size), pad_id, jnp.int32).at[:, :prompt_len].set(prompts)
  positions = jnp.broadcast_to(jnp.arange(size), (batch, size))
  rows = jnp.arange(batch)

  def cond(state):
    step, *_, done = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, buf, outputs, lengths, done = state
    filled = prompt_lengths + step
    segment_ids = (positions < filled[:, None]).astype(jnp.int32)
    logits, _ = model.apply(variables, buf, positions=positions, segment_ids=segment_ids)
    *picked, stopped = decode.pick_next(logits[rows, filled - 1], jax.random.fold_in(rng, step),
                                        sampling, done, stop_tokens, pad_id)
    outputs = tuple(o.at[:, step].set(p) for o, p in zip(outputs, picked))
    return (step + 1, buf.at[rows, filled].set(picked[0]), outputs, lengths + ~done, stopped)

  zeros = jnp.zeros((batch, max_new_tokens), jnp.float32)
  state = (jnp.int32(0), buf, (jnp.full((batch, max_new_tokens), pad_id, jnp.int32), zeros, zeros),
           jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))
  _, _, outputs, lengths, _ = jax.lax.while_loop(cond, body, state)
  return decode.GenerateOutput(*outputs, lengths)


def generate_without_cache(model, params, prompts, max_new_tokens, sampling, rng,
                           stop_tokens=(), pad_id=0, prompt_lengths=None):
  """``decode.generate``'s contract, recomputing the full forward pass for every token."""
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompt_lengths is None:
    prompt_lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
  return _no_cache(model, params, prompts, jnp.asarray(prompt_lengths, jnp.int32), rng,
                   max_new_tokens=max_new_tokens, sampling=sampling,
                   stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))


def _policy(workdir, sft_steps):
  if workdir is None:
    workdir = tempfile.mkdtemp(prefix='bench_rollout_sft_')
    config = clarify_config.get_config('sft')
    config.train.update(steps=sft_steps, tensorboard=False)
    config.rest.eval_sets = ()
    rest.sft(config, workdir)
  model, variables = ckpt_lib.load_model(workdir)
  tokenizer = tokenizers.load_tokenizer(f'{workdir}/{tokenizers.TOKENIZER_SUBDIR}')
  return model, variables, tokenizer


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--policy_workdir', default=None)
  parser.add_argument('--sft_steps', type=int, default=300)
  parser.add_argument('--episodes', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--out', default='bench_rollout.json')
  args = parser.parse_args()
  model, variables, tokenizer = _policy(args.policy_workdir, args.sft_steps)
  config = clarify_config.get_config('rest')
  env = make_env(config.env)
  formatter = ep.Formatter(tokenizer, env.roles)
  actor = ep.Actor(model, variables, decode.SamplingConfig(), config.rollout.max_new_tokens)
  actors = {'assistant': actor, 'user': actor}
  modes = {'cached': decode.generate, 'no_cache': generate_without_cache}

  def play(generate):
    rng = np.random.default_rng(0)
    episodes = [env.reset(rng, 'heldout') for _ in range(args.episodes)]
    start = time.perf_counter()
    ep.rollout(env, episodes, actors, formatter, jax.random.PRNGKey(0),
               config.rollout.max_turns, generate=generate)
    seconds = time.perf_counter() - start
    tokens = sum(len(t.ids) + t.ended for e in episodes for t in e.turns if t.ids is not None)
    turns = sum(t.ids is not None for e in episodes for t in e.turns)
    return seconds, tokens, turns, env.summary(episodes)

  for generate in modes.values():
    play(generate)  # compile every shape
  best = {}
  for _ in range(args.rounds):
    for name, generate in modes.items():
      result = play(generate)
      if name not in best or result[0] < best[name][0]:
        best[name] = result
  rows = {}
  for name, (seconds, tokens, turns, summary) in best.items():
    rows[name] = dict(seconds=round(seconds, 3), episodes_per_s=args.episodes / seconds,
                      tokens_per_s=tokens / seconds, generated_tokens=tokens, model_turns=turns,
                      rate_clarify=summary['rate/clarify'])
    print(f'{name:9s} {args.episodes / seconds:8.1f} episodes/s {tokens / seconds:9.0f} '
          f'tokens/s ({tokens} tokens in {turns} model turns, {seconds:.2f} s)')
  ratio = rows['cached']['tokens_per_s'] / rows['no_cache']['tokens_per_s']
  print(f'cached / no-cache tokens/s: {ratio:.2f}x')
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor()})'
  with open(args.out, 'w') as f:
    json.dump({'device': device, 'episodes': args.episodes, 'rounds': args.rounds,
               'rows': rows, 'cached_over_no_cache': ratio}, f, indent=1)


if __name__ == '__main__':
  main()
