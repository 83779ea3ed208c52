"""Online RL with PAV dense rewards against outcome-only RL on multi-step arithmetic
("Rewarding progress", arXiv:2410.08146, Sec. 5), one command:

  python -m launch.main --config=configs/repro/pav_rl.py --workdir=workdirs/repro_pav_rl

SFT policy and process verifier (the stages of ``configs/repro/pav_search.py``; the same
workdir reuses them) -> REINFORCE with a token-level value baseline and KL to the SFT
policy, outcome reward vs the effective reward ``Q^pi + alpha A^mu`` per step, 3 seeds at
equal sampled episodes (``rl/repro_pav_rl.py``); writes ``pav_rl.md``, ``pav_rl.json`` and
``pav_rl.png`` into the workdir.
"""
from ml_collections import config_dict

from configs.repro import pav_search


def get_config():
  config = config_dict.ConfigDict()
  config.job = 'repro_pav_rl'
  config.name = 'repro_pav_rl'
  config.seed = 0  # SFT, labelled problems, verifier training (as repro_pav_search)
  config.stages = config_dict.ConfigDict(dict(sft=pav_search.get_config().stages.sft,
                                              pav=pav_search.get_config().stages.pav))
  config.rl = config_dict.ConfigDict(dict(
      seeds=(0, 1, 2),
      alpha=3.0,  # the paper's 3-5; 0 would be outcome-only RL
      prover_k=4,  # Best-of-K prover: Q^mu = 1 - (1 - Q^pi)^K
      steps=100,  # updates per run
      batch=64,  # sampled episodes per update (one per training problem)
      learning_rate=1e-4,  # Adam, global-norm clip 1.0; set on outcome-only pilots (RESULTS)
      kl_coeff=1e-3,  # k3 estimate of KL(pi || SFT policy), as the paper's 0.001
      value_coeff=0.5,
      eval_every=10,  # updates between held-out evaluations
      eval_problems=256,
      seq_len=128,  # prompt + at most max_new_tokens + end of turn
  ))
  return config
