"""The Block Transformer paper's main models (arXiv:2406.02657, §3.1): block
length 4, lookup embedder, prefix token decoder with expansion ratio 2, GPT-NeoX layers.
The config argument picks the size:

  python -m launch.main --config=configs/block_paper.py:b4_85 --config.dry_run=True

Sizes from the authors' ``conf/trainer/block_main_b4_*.yaml``: block and token decoders have
the same depth and width; both start from pythia-410m-deduped's config with only depth and
width changed, so every size has 16 heads, MLP width 4096 and rotary on 25% of each head's
dims. Each sequence is 2048 tokens (512 blocks of 4 for the block decoder); the optimiser,
batch and step counts are the yaml's (``configs/pythia.py: neox_pretraining``).

Parameter counts from the dry run. ``non-embedding`` is every parameter outside
``embedder`` (the token decoder's embedding and LM head), so it includes the block
embedder's lookup table (50304 x d/4); ``decoder layers`` (both decoders) excludes that table,
the prefix projection and the start context as well. The paper names each model by
12·d²·L over both decoders' L layers, i.e. layers with MLP width 4d:

  | config  | L + L   | d    | non-embedding | total         | decoder layers | 12·d²·L (name) |
  |---------|---------|------|---------------|---------------|----------------|----------------|
  | b4_5    | 3 + 3   | 256  | 17,546,496    | 43,302,144    | 14,194,176     | 4.7M (5)       |
  | b4_19   | 3 + 3   | 512  | 38,476,288    | 89,987,584    | 31,509,504     | 18.9M (19)     |
  | b4_85   | 6 + 6   | 768  | 114,784,512   | 192,051,456   | 103,941,120    | 84.9M (85)     |
  | b4_300  | 12 + 12 | 1024 | 317,291,520   | 420,314,112   | 302,309,376    | 302.0M (300)   |
  | b4_800  | 8 + 8   | 2048 | 571,389,952   | 777,435,136   | 537,231,360    | 805.3M (800)   |
  | b4_1.2b | 12 + 12 | 2048 | 840,005,632   | 1,046,050,816 | 805,847,040    | 1208.0M (1.2B) |

How they compare: at d = 1024 the MLP width 4096 is 4d and our decoder layers match the
paper's name (302.3M vs 300M). At the other widths the authors' configs keep pythia-410m's MLP
width 4096 instead of 4d, so the models they instantiate (and these) are larger than their
names below d = 1024 (b4_5: MLP 16d, 14.2M vs 4.7M; b4_85: 103.9M vs 85M) and smaller at
d = 2048 (MLP 2d; b4_800: 537M vs 800M). ``--config.model.mlp_dim=`` 4d gives the layers the
names describe.
"""
from configs import base
from configs.pythia import neox_model_config, neox_pretraining

# Per size: depth of each decoder, width, learning rate, global batch, steps, warm-up steps.
SIZES = {
    'b4_5': (3, 256, 1e-3, 256, 572_000, 3000),
    'b4_19': (3, 512, 1e-3, 256, 572_000, 3000),
    'b4_85': (6, 768, 6e-4, 256, 572_000, 3000),
    'b4_300': (12, 1024, 3e-4, 256, 572_000, 3000),
    'b4_800': (8, 2048, 3e-4, 512, 286_000, 1500),
    'b4_1.2b': (12, 2048, 2e-4, 512, 286_000, 1500),
}
BLOCK_LEN = 4


def get_config(size='b4_85'):
  if size not in SIZES:
    raise ValueError(f'configs/block_paper.py:{size}: the size must be one of {sorted(SIZES)}.')
  layers, width, learning_rate, batch_size, steps, warmup_steps = SIZES[size]
  config = base.base_config()
  config.name = f'block_{size}'
  config.model = neox_model_config(name='block', embed_dim=width, num_layers=layers,
                                   num_heads=16, num_kv_heads=16, mlp_dim=4096)
  config.model.update(dict(block_len=BLOCK_LEN, block_layers=layers, token_layers=layers,
                           token_embed_dim=0, token_decoder='prefix', expansion_ratio=2,
                           predict_first_block=True))
  config = neox_pretraining(config, learning_rate, batch_size, steps, warmup_steps)
  config.data.block_len = BLOCK_LEN
  config.sample.max_new_tokens = 0  # cached generation of the block family is not built yet
  return config
