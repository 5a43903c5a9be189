"""Seed study on the toy data: the toy config trained with 3 seeds (initialisation and data
order; the phantoms stay the same), then how stable C_t / C_d and their ranks are.

    python -m experiments.sweep --config=configs/toy.py \
        --sweep=experiments/sweeps/toy_seeds.py --root=/tmp/toy_seeds
    python -m experiments.seed_study /tmp/toy_seeds

Three seeds because one toy training takes about 7 minutes on a 2-core CPU; extend the list
for a tighter estimate (finished points are skipped when the sweep is launched again).
"""

from experiments.sweep_lib import sweep


def get_sweep():
  return sweep("train.seed", [0, 1, 2])
