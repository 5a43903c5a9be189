"""Fields every experiment config has; each `configs/<experiment>.py` starts from these.

Any field can be overridden on the command line, e.g. `--config.train.lr=1e-4`; an unknown key
is an error that names it (the config is locked).
"""

import ml_collections

from input_pipeline.config import default_data_config
from seq2seq_jax.models.config import make_model_config


def base_config(**model_kwargs) -> ml_collections.ConfigDict:
  """A complete config; `model_kwargs` are the official model keys (see models/config.py)."""
  c = ml_collections.ConfigDict()
  c.model = make_model_config(**model_kwargs)

  # Where the data comes from and where its prepared shards go; the same fields in every
  # config, so any model config can be pointed at any dataset (input_pipeline/README.md).
  c.data = default_data_config()

  t = c.train = ml_collections.ConfigDict()
  # Official names.
  t.epochs = 1000            # length of the poly LR schedule (one LR per epoch)
  t.total_steps = 1_000_000  # training stops here (or after `epochs`, whichever is first)
  t.lr = 2e-4                # Adam, betas .9/.999, eps 1e-8
  t.min_lr = 1e-6            # poly schedule end point: lr_e = min + (lr - min)(1 - e/E)^0.9
  t.rep_step = 8             # random crops drawn from a subject each time it is read
  t.crop_size = (1, 192, 192)    # training crop: [slices, H, W] (2D/2.5D) or [D, H, W] (3D)
  t.valid_size = (16, 192, 192)  # centre crop for validation, same convention
  t.lambda_rec = 10.0
  t.lambda_per = 0.01        # > 0 needs `vgg_weights`
  t.lambda_cyc = 10.0
  t.vis_steps = 128          # PNG sample grids every this many steps (0: never)
  t.ckpt_steps = 1280        # checkpoint every this many steps (and at the end)
  # Ours.
  t.batch_size = 1           # global batch (split over processes and the mesh's data axis)
  # One (src, tgt) pair for the whole batch (as the official batch of 1) instead of one per
  # example: the decoder then builds one kernel per hyperconv, which is faster on every device.
  t.pair_per_batch = False
  t.seed = 0
  t.dtype = "float32"        # compute dtype: float32 | bfloat16 (params stay float32)
  t.remat = False            # recompute blocks and full-resolution stages in the backward pass
  # Keep only conv outputs for the backward pass, recomputing norms, activations, padding and
  # upsampling: less memory at the same speed on brats2d/brats3d, 11% slower on the toy model.
  t.recompute_elementwise = False
  # Convolutions: "cpu_tuned" (3D as 2D slices and GEMM forms where XLA CPU's convs are slow),
  # "xla" (XLA's own, as cuDNN and TPUs run best), "auto": cpu_tuned on CPU, else xla.
  t.conv_forms = "auto"
  t.max_nonfinite = 10       # stop after this many non-finite steps in a row
  t.vgg_weights = ""         # torchvision vgg19 state_dict (.pth or .npz) for lambda_per > 0
  t.log_steps = 50           # host-side metric pull + TensorBoard scalars every N steps
  t.eval_steps = 0           # validate every N steps; 0: once per epoch (official); -1: never
  t.eval_subjects = 0        # validate on the first N validation subjects; 0: all
  # XLA CPU only: the plain scheduler (same brats2d step time, 45% less step memory) instead
  # of the concurrency-optimised one (14% faster on tiny models). Set before the backend starts.
  t.xla_cpu_lean_scheduler = True
  # XLA CPU only: its MLIR fusion emitters (default) or its older LLVM IR ones, which compile
  # with ~200 MB less peak memory, 2x slower, same step time on the toy model (host_memory.py).
  t.xla_cpu_fusion_emitters = True
  # XLA CPU only: its convolutions through Eigen instead of YNNPACK (2-4x faster on most
  # layers here; gemm_conv's forms adapt). Set before the backend starts (host_memory.py).
  t.xla_cpu_eigen_convs = True
  # CPU only: glibc keeps freed pages for reuse, so XLA's per-step temporaries are not
  # page-faulted in anew every step (toy step -5%), and single-device steps run inline so that
  # each frees them before the next allocates its own (host_memory.py). Off by default: with
  # async steps brats2d once peaked at 6.5 instead of 3.9 GB; with inline ones, brats2d and
  # brats3d peaked as without it, with no clear speed gain (experiments/README.md).
  t.cpu_heap_reuse = False
  t.keep_ckpts = 3           # latest checkpoints kept (the best one by PSNR is kept too)
  t.data_shards = 0          # loader shards making up a global batch; 0: one per process.
                             # Fix it to reproduce a run exactly on another process count.

  # `--mode=evaluate` options.
  e = c.eval = ml_collections.ConfigDict()
  e.lpips_weights = ""       # LPIPS-alex weights (.pth or .npz, see seq2seq_jax/lpips.py): fills
                             # the `lpips` column; empty: the column stays empty

  # Device mesh: axis sizes, -1 = all remaining devices. `data` splits the batch, `spatial`
  # the first spatial axis (depth in 3D) for volumes too large for one device.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.spatial = 1
  return c
