"""Block Transformer vs vanilla at equal loss, in miniature (arXiv:2406.02657, Fig. 1).

Four vanilla Llama models and three Block Transformers (prefix token decoder, L_B = 4,
block and token decoders of equal depth) trained on pycorpus with vanilla_tiny's recipe and
the same token budget; each model's decode throughput (decode-heavy: 32-token prompts, 512
new tokens) at its largest batch under one memory cap. Writes block_isoloss.{md,json,png}
into the workdir (8 minutes on 2 shared CPU cores):

  python -m launch.main --config=configs/repro/block_isoloss.py --workdir=workdirs/repro_block
"""
import ml_collections

from configs import base, block_tiny


def _block(embed_dim, depth):
  """block_tiny's model at width ``embed_dim`` with ``depth`` block and token layers."""
  model = block_tiny.get_config().model
  model.update(dict(embed_dim=embed_dim, mlp_dim=3 * embed_dim, num_layers=depth,
                    block_layers=depth, token_layers=depth))
  return model


def get_config():
  config = ml_collections.ConfigDict()
  config.job = 'repro_block'
  config.seed = 0
  pretrain = base.base_config()
  pretrain.data.seq_len = 128
  pretrain.data.batch_size = 16
  pretrain.train = base.train_config(steps=400, learning_rate=3e-3, warmup_steps=40,
                                     eval_every=400, eval_batches=16, checkpoint_every=400,
                                     async_checkpointing=False, tensorboard=False, log_every=50)
  config.base = pretrain
  shape = dict(num_heads=4, num_kv_heads=2)
  # Bigger block models trained worse than smaller ones at this budget (d256 4+4: 2.22 nats),
  # and every block model worse than a 2-layer d=64 vanilla, so the vanilla curve reaches down
  # to one-layer models to bracket the block models' losses.
  config.variants = ml_collections.ConfigDict({  # full model configs; block_len set per run
      'vanilla_d32_L1': base.model_config(embed_dim=32, num_layers=1, mlp_dim=96, **shape),
      'vanilla_d48_L1': base.model_config(embed_dim=48, num_layers=1, mlp_dim=144, **shape),
      'vanilla_d64_L2': base.model_config(embed_dim=64, num_layers=2, mlp_dim=192, **shape),
      'vanilla_d128_L4': base.model_config(embed_dim=128, num_layers=4, mlp_dim=384, **shape),
      'block_d96_B2_T2': _block(96, 2),
      'block_d128_B2_T2': _block(128, 2),
      'block_d192_B3_T3': _block(192, 3),
  })
  # Decode-heavy setting of bench/block_decode.py; one cap for every model (parameters + KV
  # cache, bytes as stored); each model at its largest batch <= max_batch under it.
  config.throughput = ml_collections.ConfigDict(dict(
      prompt_len=32, new_tokens=512, cap_mib=32.0, max_batch=128, rounds=2))
  return config
