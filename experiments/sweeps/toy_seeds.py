"""Seed study on the toy data: the toy config trained with 5 seeds (initialisation and data
order; the phantoms stay the same), then how stable C_t / C_d and their ranks are.

    python -m experiments.sweep --config=configs/toy.py \
        --sweep=experiments/sweeps/toy_seeds.py --root=/tmp/toy_seeds
    python -m experiments.seed_study /tmp/toy_seeds
"""

from experiments.sweep_lib import sweep


def get_sweep():
  return sweep("train.seed", [0, 1, 2, 3, 4])
