"""Learning rate x seed on the toy config: which lr, and how much of the difference is seed
noise (collate reports mean +- std over the seeds of each lr).

    python -m experiments.sweep --config=configs/toy.py \
        --sweep=experiments/sweeps/toy_lr_seed.py --root=/tmp/toy_lr_seed
    python -m experiments.collate /tmp/toy_lr_seed --metric=eval_psnr --x=train.lr
"""

from experiments.sweep_lib import product, sweep


def get_sweep():
  return product(sweep("train.lr", [3e-4, 1e-3, 3e-3]), sweep("train.seed", [0, 1, 2]))
