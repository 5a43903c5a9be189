"""Train state, optimizer and the jitted, sharded train step.

The state is a plain dict pytree, `{'params', 'opt_state', 'step', 'rng', 'nonfinite'}`, so
that orbax saves and restores it without registrations; `nonfinite` counts the non-finite
steps in a row (their updates are never applied).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from seq2seq_jax import host_memory
from seq2seq_jax import sharding
from seq2seq_jax.losses import seq2seq_objective
from seq2seq_jax.models import Generator
from seq2seq_jax.models import conv
from seq2seq_jax.models import sharded_conv
from seq2seq_jax.models.hyperconv import NORM_PROBES, norm_probes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"config.train.dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


def make_model(config: ml_collections.ConfigDict) -> Generator:
  return Generator.from_config(config.model, dtype=compute_dtype(config.train.dtype),
                               remat=bool(config.train.remat),
                               recompute_elementwise=bool(config.train.recompute_elementwise))


def poly_epoch_schedule(lr: float, min_lr: float, epochs: int,
                        steps_per_epoch: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The official LR: constant within an epoch, min + (lr - min)·(1 - epoch/epochs)^0.9."""
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs - 1).astype(jnp.float32)
    return min_lr + (lr - min_lr) * (1.0 - epoch / epochs) ** 0.9
  return schedule


def make_optimizer() -> optax.GradientTransformation:
  """Adam (betas .9/.999, eps 1e-8, as torch's default) whose LR is set by the step."""
  return optax.inject_hyperparams(optax.adam)(learning_rate=0.0)


def guarded_adam(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                 finite: jnp.ndarray) -> tuple[Any, Any]:
  """`make_optimizer()`'s step, applied only where `finite`: `(new_params, new_opt_state)`.

  The moments come from `tx.update`; the params from the moments after the keep-select, with
  `optax.adam`'s arithmetic (bias correction, `m / (sqrt(v + eps_root) + eps)`, `-lr`), so
  that when `finite` they equal `optax.apply_updates(params, tx.update(...)[0])`. Computed
  from optax's own update instead, XLA recomputed the new moments inside every param's pass,
  which then read the old mu and nu while their in-place update overwrote them, so it copied
  all of mu and nu first: 1.18 GB of copies per `brats2d` step.
  """
  _, new_opt = tx.update(grads, opt_state, params)
  keep = lambda new, old: jnp.where(finite, new, old)
  kept = jax.tree_util.tree_map(keep, new_opt, opt_state)
  hp, adam = kept.hyperparams, kept.inner_state[0]
  c1 = 1 - hp["b1"] ** adam.count
  c2 = 1 - hp["b2"] ** adam.count
  step_size = -1 * hp["learning_rate"]

  def param(p, m, v):
    u = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype) + hp["eps_root"]) +
                                    hp["eps"])
    return jnp.where(finite, jnp.asarray(p + step_size * u).astype(p.dtype), p)

  return jax.tree_util.tree_map(param, params, adam.mu, adam.nu), kept


def sq_norm_bound(grads: Any, bank_norms: Any) -> jnp.ndarray:
  """An upper bound on ‖grads‖² that is exact where each hyper bank is used once a step (as
  in `losses.seq2seq_objective`, which builds all its codes' kernels in one use): the banks
  in `bank_norms` (the gradients of `hyperconv.norm_probes`, on the same paths as the banks:
  each the sum of its uses' norms) count as those squared, every other leaf as itself."""
  norms = jax.tree_util.tree_flatten_with_path(bank_norms)[0]
  probed = {jax.tree_util.keystr(path) for path, _ in norms}
  total = sum(jnp.square(n) for _, n in norms)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if jax.tree_util.keystr(path) not in probed:
      g = jax.lax.optimization_barrier(g)
      total = total + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return jnp.asarray(total, jnp.float32)


def init_state(model: Generator, config: ml_collections.ConfigDict, sample_x: Any) -> dict:
  """Fresh params with the official init, Adam state, step 0; deterministic in the seed."""
  rng = jax.random.PRNGKey(int(config.train.seed))
  init_rng, rng = jax.random.split(rng)
  code = jnp.zeros((1, model.c_s), jnp.float32)
  params = model.init(init_rng, sample_x, code)["params"]
  return {"params": params, "opt_state": make_optimizer().init(params),
          "step": jnp.zeros((), jnp.int32), "rng": rng, "nonfinite": jnp.zeros((), jnp.int32)}


def create_state(model: Generator, config: ml_collections.ConfigDict, sample_x: Any,
                 state_sharding: Any) -> dict:
  """`init_state`, jitted onto `state_sharding` (compiled as host_memory says for one-offs)."""
  init = jax.jit(lambda x: init_state(model, config, x), out_shardings=state_sharding)
  options = host_memory.one_off_compile_options() or None
  return init.lower(sample_x).compile(compiler_options=options)(sample_x)


def abstract_state(model: Generator, config: ml_collections.ConfigDict, sample_x: Any) -> dict:
  return jax.eval_shape(lambda x: init_state(model, config, x), sample_x)


def state_shardings(mesh: Mesh, abstract: Any) -> Any:
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(lambda _: rep, abstract)


def compile_step(step_fn, *args):
  """AOT-compiles a jitted step for `args` (so callers can free host memory before running)."""
  return step_fn.lower(*args).compile()


def make_train_step(model: Generator, config: ml_collections.ConfigDict,
                    schedule: Callable, mesh: Mesh, state_sharding: Any,
                    batch_ndims: Mapping[str, int]):
  """Returns `step(state, batch, vgg) -> (state, metrics)`, jitted with shardings.

  `batch` holds `src`, `tgt` `[b, t, *spatial, c_in]` and `src_code`, `tgt_code` `[b, c_s]`
  (a target per example; with `config.train.pair_per_batch` the loader makes every row the
  same and the step uses row 0 as the batch's one code). A step whose loss, gradient or
  learning rate is not finite leaves params and optimizer state untouched and increments
  `state['nonfinite']`.
  """
  tc = config.train
  tx = make_optimizer()

  def step(state, batch, vgg):
    src_code, tgt_code = batch["src_code"], batch["tgt_code"]
    if tc.pair_per_batch:
      src_code, tgt_code = src_code[:1], tgt_code[:1]

    def loss_fn(params, probes):
      return seq2seq_objective(
          model, {"params": params, NORM_PROBES: probes}, batch["src"], batch["tgt"],
          src_code, tgt_code, lambda_rec=tc.lambda_rec, lambda_cyc=tc.lambda_cyc,
          lambda_per=tc.lambda_per, vgg=vgg)

    # On a spatially sharded array the convs run per shard (`sharded_conv.sharded_reflect_conv`;
    # with the CPU-tuned forms the large 3D ones only).
    probes = norm_probes(state["params"])
    with sharded_conv.spatial_sharding(mesh), conv.forms(tc.conv_forms):
      (total, terms), (grads, bank_norms) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(state["params"], probes)
    lr = schedule(state["step"])
    opt_state = state["opt_state"]
    opt_state.hyperparams["learning_rate"] = lr
    # Decided before the update, from the loss, a bound on the gradient's global norm (inf as
    # soon as any g² would overflow Adam's second moment) and the LR, so that XLA fuses update
    # and select into in-place passes (see guarded_adam). Deciding on the new params instead
    # kept params, mu and nu all alive twice: +1.2 GB of temporaries on brats2d. The hyper
    # banks' norms come from their gradients' factors (`hyperconv.bank_kernels`), so that their
    # gradients (most of the state on brats2d) are never written out, only recomputed in
    # Adam's passes. Each other gradient reaches the norm through its own barrier, so that
    # XLA cannot share the norm's g² with Adam's second moment: shared, g² was written out in
    # full for XLA CPU's reduce (a YNNPACK kernel of its own) and read back by nu's pass.
    norm = jnp.sqrt(sq_norm_bound(grads, bank_norms))
    finite = jnp.isfinite(total) & jnp.isfinite(norm) & jnp.isfinite(lr)
    new_params, new_opt = guarded_adam(tx, grads, opt_state, state["params"], finite)
    rng, _ = jax.random.split(state["rng"])
    new_state = {
        "params": new_params,
        "opt_state": new_opt,
        "step": state["step"] + 1,
        "rng": rng,
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32),
    }
    metrics = {"loss": total, "rec": terms["rec"], "cyc": terms["cyc"], "per": terms["per"],
               "lr": lr, "finite": finite.astype(jnp.float32)}
    return new_state, metrics

  rep = sharding.replicated(mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, n) for k, n in batch_ndims.items()}
  return jax.jit(step, in_shardings=(state_sharding, batch_sh, rep),
                 out_shardings=(state_sharding, rep), donate_argnums=(0,))
