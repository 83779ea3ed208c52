"""Collaborative self-play for tool use and selective prediction (arXiv:2503.14481) in
miniature: SFT (memorised facts + demonstrations), then ReST on the society's rollouts.

  python -m launch.main --config=configs/rl/collab.py:sft --workdir=workdirs/collab/sft
  python -m launch.main --config=configs/rl/collab.py:oracle --workdir=workdirs/collab/oracle
  python -m launch.main --config=configs/rl/collab.py:rest --workdir=workdirs/collab/rest \
      --config.rest.init_workdir=workdirs/collab/sft

``sft``: the memorised facts as plain text (statements and question-answer text,
``CollabEnv.pretraining_texts``) and as closed-book quiz conversations
(``pretraining_episodes``), plus format demonstrations whose actions ignore what is memorised
(a tool call half the time, an answer or a hedge a quarter each: the in-context baseline and
ReST's start; 6,000 of them, half per mode, so that a delegated helper learns to copy the spelt
name into its search, which 3,000 did not teach, docs/RESULTS.md); ``oracle``: the ``sft``
policy fine-tuned (300 steps, its tokenizer) on the same facts plus ``oracle_turn``
demonstrations (the action-supervised baseline, from the same pretrained policy as the
others). Both train on both modes' demonstrations, which ask the questions of the ``demo``
split (none of ReST's ``train`` facts appears in a demonstration's tool result), and the
format demonstrations also those of the ``demo_ood`` split, a quarter of the ood questions
(the tool shown on every fact type, as an LLM has seen it; the decision is trained on the
train relations only, and the criteria judge the other ood questions); both are
evaluated as the single agent; ``rest`` plays the society (every role the same policy) and
trains on its rollouts with each retrieved value replaced by a counterfactual one
(``CollabEnv.relabel``: the turns after a search teach reading the result, not the fact),
keeping a checkpoint per iteration (the job chooses one on held-out questions). The world
(``rl/envs/collab.py``): two thirds of the subjects memorised (an agent that gets every
answer right searches at best on a third of the questions, 3x fewer than always searching:
inside the paper's 2-5x; with half, 2x was the best any agent could do, docs/RESULTS.md),
memory by entity, every unmemorised train or demo question about a
newly drawn name (3-syllable names, the first 1,000 spare names), 240 quizzes about unknown
entities answered ``hedge``, every name one token of its own that the pretraining text
spells, and the question writing the name as its word and spelt, calls and tool results
spelling it (``name_tokens``, ``spelt_names``), and the asker's delegation written as the
single agent's call, ``search people SUBJECT RELATION`` (``asker_call_word``), and costing
what that call costs the single agent (``delegation_cost`` = ``search_cost``): with free
delegations the asker answering a memorised question and the asker delegating it to a helper
that answers from memory earned the same, ReST kept either, and the single agent inherited
the second as paid searches on memorised questions (docs/RESULTS.md, measurement 7). The
whole reproduction is ``configs/repro/collab.py``.
"""
from configs import base
from rl import episodes, play, rest
from rl.envs import collab

ROLES = ('system', 'user', 'assistant', 'asker') + tuple(collab.CORPORA) + ('tool',)


def get_config(stage='sft'):
  if stage not in ('sft', 'oracle', 'rest'):
    raise ValueError(f"configs/rl/collab.py:{stage}: the stage must be 'sft', 'oracle' or "
                     "'rest'.")
  config = base.base_config()
  config.job = 'rl_rest' if stage == 'rest' else 'rl_sft'
  config.name = f'collab_{stage}'
  config.env = collab.default_config()
  config.env.update(subjects_per_corpus=120, memorised_fraction=2 / 3, demo_fraction=0.25,
                    generic_actions=(0.5, 0.25, 0.25), memorise_by='subject',
                    unknown_subjects='fresh', name_syllables=3, quiz_unknown=240,
                    name_tokens=True, spare_names=1000, spelt_names=True,
                    demo_ood_fraction=0.25, asker_call_word='search', delegation_cost=0.1,
                    mode='society' if stage == 'rest' else 'single')
  config.tokenizer.update(kind='sentencepiece', vocab_size=2048,
                          reserved_tokens=episodes.reserved_tokens(ROLES))
  config.model = base.model_config(vocab_size=2048, embed_dim=128, num_layers=3, num_heads=4,
                                   num_kv_heads=2, mlp_dim=384)
  config.data.seq_len = 96  # demonstrations: at most 64 tokens (the tokenizer is each stage's)
  config.data.batch_size = 64
  config.sft = rest.default_sft_config()
  config.sft.update(episodes=6000, roles=('assistant', 'asker') + tuple(collab.CORPORA),
                    behaviour='oracle' if stage == 'oracle' else 'generic',
                    env_variants=({'mode': 'single'}, {'mode': 'society'}),
                    pretraining_repeats=10,
                    splits=('demo', 'demo_ood') if stage == 'sft' else ('demo',))
  config.rest = rest.default_rest_config()
  config.rest.update(trained_roles=('asker',) + tuple(collab.CORPORA),
                     eval_sets=('test', 'ood'),
                     eval_modes=('greedy',), eval_episodes=32, final_eval_episodes=64)
  config.rollout = play.default_rollout_config()
  config.rollout.update(max_turns=4, max_new_tokens=12)
  if stage == 'rest':
    # 5 iterations: with 6 (docs/RESULTS.md, measurement 4) the single agent's reward on the
    # held-out demo questions, which chooses the iteration, peaked by the 5th in every seed
    config.rest.update(iterations=5, prompts=256, samples_per_prompt=8, max_per_prompt=1,
                       thresholds=(0.25,), steps_per_improve=60)
    config.train = base.train_config(steps=0, learning_rate=3e-4, schedule='constant',
                                     warmup_steps=0, eval_every=0, log_every=20,
                                     weight_decay=0.0, checkpoint_every=60, keep_checkpoints=5)
  elif stage == 'oracle':  # a fine-tune of the sft policy (sft.init_workdir)
    config.sft.init_workdir = 'workdirs/collab/sft'
    config.train = base.train_config(steps=300, learning_rate=1e-3, warmup_steps=20,
                                     eval_every=0, checkpoint_every=300, log_every=50)
  else:
    config.train = base.train_config(steps=1200, learning_rate=3e-3, warmup_steps=50,
                                     eval_every=0, checkpoint_every=400, log_every=50)
  config.sample.max_new_tokens = 0
  return config
