"""2 learning rates x 2 seeds of the tiny config: the sweep tests' sweep (seconds per point).

    python -m experiments.sweep --config=configs/tiny.py \
        --sweep=experiments/sweeps/tiny_2x2.py --root=/tmp/tiny_2x2
"""

from experiments.sweep_lib import product, sweep


def get_sweep():
  return product(sweep("train.lr", [1e-3, 2e-3]), sweep("train.seed", [0, 1]))
