"""The seed study's smoke version: the tiny config with 3 seeds (see toy_seeds.py).

    python -m experiments.sweep --config=configs/tiny.py \
        --sweep=experiments/sweeps/tiny_seeds.py --root=/tmp/tiny_seeds
    python -m experiments.seed_study /tmp/tiny_seeds
"""

from experiments.sweep_lib import sweep


def get_sweep():
  return sweep("train.seed", [0, 1, 2])
