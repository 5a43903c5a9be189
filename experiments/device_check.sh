#!/usr/bin/env bash
# Issue 7's accelerator rows in one prepared run: the train-step benchmark in float32 and
# bf16 (s/step, GFLOP/s, MFU, device memory) and the largest 3D crop on one card, with and
# without remat. Each part prints JSON lines into OUT_DIR/<part>.jsonl (stderr beside it).
#
#   bash experiments/device_check.sh OUT_DIR [bench] [fit] [size] [batch] [profile] [nhwc]
#       [train] [toy]
#
# bench: brats2d and brats3d (one 64³ crop), float32 (TF32 convs under JAX's default
#   precision) and bf16, XLA's own conv forms (`config.train.conv_forms=auto` off the CPU);
# size: brats3d's largest cube whose gradient step fits BUDGET_GB (default 120) by XLA's
#   memory plan (`experiments.spatial_scaling`, 1 device), then one real step at that cube
#   (its row's device_peak_mb: what the allocator really took); JAX may take 92% of the
#   card (XLA_PYTHON_CLIENT_MEM_FRACTION). `experiments.gpu_plan` gives the plan without a
#   card, for comparison;
# fit: one real brats3d step (timed FIT_STEPS times, default 2, after the first; 0 still
#   prints the row, with the allocator's peak, after the first) at each cube of FIT (default
#   "448:False 484:True", edge:remat: the largest cubes `experiments.gpu_plan` plans within
#   75% of an H200 in float32, without and with remat), with the allocator's peak: the
#   size check without `size`'s compilations of the search;
# batch: brats2d at batch BATCH (default 16), bf16 and float32 (a GPU at batch 1 is idle);
# profile: `experiments.profile_step` (3 traced steps) on each CONFIG:DTYPE of PROFILE
#   (default "brats2d:bfloat16 brats3d:float32"); its table in profile.jsonl, and the
#   perfetto traces with the steps' HLO in profile.tgz, to sum up elsewhere
#   (`profile_step --analyze=TRACE,HLO`);
# nhwc: brats3d 64³ in float32 and bf16, each without and with
#   `--xla_gpu_force_conv_nhwc=true` (cuDNN's convs channels-last instead of XLA's
#   channels-first, which in float32 cost cuDNN's own layout transposes: 9% of the step);
#   rows told apart by their `xla_flags`;
# train: `main.py` on the toy default end to end on the card (data made on first use):
#   TRAIN_STEPS steps (default "200 300": 200, then resumed from its checkpoint to 300),
#   its output in train.jsonl / train.err, the runs' "done: ..." lines (and the second's
#   "resumed from") in the summary;
# toy: the toy default's model, float32 and bf16.
# With no part named it runs bench then size. Every command has its own time limit (LIMIT_S,
# default 150 s; SIZE_LIMIT_S for size's and fit's, twice that), so one slow compile cannot
# take the whole run. On one H200: each bench command 33–52 s, fit at 256³ 69 s (twenty-fourth
# session); at 448³ / 484³ (remat) over 230 s each: with cuDNN's autotuning the command had
# not ended after 200 s (nothing printed), without it (FIT_XLA_FLAGS below) the compile took
# 14–16 s and each step 140 / 176 s, so both cubes with FIT_STEPS=0 need about 6 minutes
# that way.
#
# This workplace's CUDA image has JAX 0.11.2 and no ml_collections: carry wheels in .whl/
# (ignored by git), as that session did: `python3 -m pip download --no-deps
# --only-binary=:all: -d .whl ml_collections==1.1.0 flax==0.12.8 optax==0.2.8` (flax and
# optax at the versions the tests run, in place of the image's own); this script installs
# what it finds there.
set -u
out=${1:?usage: device_check.sh OUT_DIR [bench] [fit] [size] [batch] [profile] [nhwc] [train] [toy]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(bench size)
mkdir -p "$out"
limit=${LIMIT_S:-150}
# up to five compilations of brats3d each; one real step at 448³ (fit) took over 200 s
size_limit=${SIZE_LIMIT_S:-$((2 * limit))}
budget=${BUDGET_GB:-120}
size=${SIZE:-64,64,64}  # the first measured volume of `size` (a smaller one for a dry run)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# JAX takes 75% of a GPU's memory by default (105 GiB of an H200's 140), under BUDGET_GB.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi -L 2>/dev/null
  $py -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__,
jax.devices())"; } > "$out/devices.txt" 2>&1

# run PART NAME ARGS...: one command, its JSON lines appended to PART.jsonl.
run() {
  local part=$1 name=$2
  shift 2
  local t0=$SECONDS
  local t=$limit
  case $part in size|fit) t=$size_limit ;; esac
  timeout "$t" "$py" "$@" >> "$out/$part.jsonl" 2>> "$out/$part.err"
  echo "$part $name rc=$? $((SECONDS - t0)) s" >> "$out/summary.txt"
}

bench() {  # config, steps, then dtypes; into the current part's file (EXTRA: more flags)
  local cfg=$1 steps=$2
  shift 2
  # JAX's CUDA backend counts no FLOPs for cuDNN's convs: the same step's count comes from
  # the CPU, XLA's own conv forms (the GPU's program), compiled beside the GPU runs.
  JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES="" timeout "$limit" "$py" -m experiments.benchmark \
      --config="$cfg" --compile_only --config.train.conv_forms=xla ${EXTRA:-} \
      >> "$out/counts.jsonl" 2>> "$out/counts.err" &
  for dtype in "$@"; do
    run "$part" "$(basename "$cfg" .py)-$dtype" -m experiments.benchmark --config="$cfg" \
        --steps="$steps" --config.train.dtype="$dtype" ${EXTRA:-}
  done
}

for part in "${parts[@]}"; do
  case $part in
    bench)
      bench configs/brats2d.py 10 bfloat16 float32
      bench configs/brats3d.py 10 bfloat16 float32 ;;
    toy)
      bench configs/toy.py 30 bfloat16 float32 ;;
    train)
      rm -rf /tmp/seq2seq_gpu_toy
      for steps in ${TRAIN_STEPS:-200 300}; do
        run train "toy-to-$steps" main.py --config=configs/toy.py \
            --workdir=/tmp/seq2seq_gpu_toy --config.train.total_steps="$steps"
      done
      grep -h "^done:\|resumed from" "$out/train.jsonl" "$out/train.err" >> "$out/summary.txt" ;;
    nhwc)
      nhwc_cfg=${NHWC_CONFIG:-configs/brats3d.py}  # (a smaller one for a dry run)
      for dtype in float32 bfloat16; do
        for flag in "" --xla_gpu_force_conv_nhwc=true; do
          XLA_FLAGS="${XLA_FLAGS:-} $flag" \
              run nhwc "$(basename "$nhwc_cfg" .py)-$dtype${flag:+-nhwc}" -m experiments.benchmark \
              --config="$nhwc_cfg" --steps=10 --config.train.dtype="$dtype" --eval_volumes=0 \
              --conv_ref=false
        done
      done ;;
    batch)
      EXTRA="--config.train.batch_size=${BATCH:-16} --eval_volumes=0 --conv_ref=false" \
          bench configs/brats2d.py 10 bfloat16 float32 ;;
    profile)
      rm -rf /tmp/seq2seq_prof && mkdir -p /tmp/seq2seq_prof
      for spec in ${PROFILE:-brats2d:bfloat16 brats3d:float32}; do
        name=${spec%%:*}-${spec##*:} p=/tmp/seq2seq_prof/$name
        run profile "$name" -m experiments.profile_step --config="configs/${spec%%:*}.py" \
            --config.train.dtype="${spec##*:}" --steps=3 --top=40 --trace_dir="$p" \
            --hlo_out="$p.hlo"
        trace=$(ls "$p"/*/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null | tail -1)
        [ -n "$trace" ] && cp "$trace" "$p.trace.json.gz"
      done
      (cd /tmp/seq2seq_prof && tar -czf - ./*.hlo ./*.trace.json.gz) > "$out/profile.tgz" ;;
    fit)
      for spec in ${FIT:-448:False 484:True}; do
        edge=${spec%%:*} remat=${spec##*:}
        # FIT_XLA_FLAGS, e.g. --xla_gpu_autotune_level=0: cuDNN's heuristic algorithms
        # instead of timing every one at that size: fits are shown sooner, but the steps
        # are slow (256³: 21.8 s against 1.36 s autotuned, twenty-fifth session).
        XLA_FLAGS="${XLA_FLAGS:-} ${FIT_XLA_FLAGS:-}" run fit "run-$edge-remat=$remat" \
            -m experiments.spatial_scaling \
            --config=configs/brats3d.py --size="$edge,$edge,$edge" \
            --time_steps="${FIT_STEPS:-2}" \
            --config.train.remat="$remat"
      done ;;
    size)
      for remat in False True; do
        run size "budget-remat=$remat" -m experiments.spatial_scaling \
            --config=configs/brats3d.py --size="$size" --budget_gb="$budget" \
            --config.train.remat="$remat"
        edge=$($py -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
print(rows[-1].get('max_cubic_edge', 0) if rows else 0)" "$out/size.jsonl")
        if [ "${edge:-0}" -gt 0 ]; then  # that cube, run for real (a step, timed once)
          run size "run-$edge-remat=$remat" -m experiments.spatial_scaling \
              --config=configs/brats3d.py --size="$edge,$edge,$edge" --time_steps=1 \
              --config.train.remat="$remat"
        fi
      done ;;
    *) echo "unknown part $part (bench, fit, size, batch, profile, nhwc, train, toy)" >&2; exit 2 ;;
  esac
done
wait  # the FLOP counts
# Each benchmark row with the CPU's count for its config and batch: TFLOP/s and MFU.
[ -f "$out/counts.jsonl" ] && "$py" - "$out" >> "$out/summary.txt" <<'EOF'
import glob, json, os, sys
rows = lambda f: [json.loads(l) for l in open(f) if l.startswith("{")]
counts = {(r["config"], tuple(r["batch"])): r["gflop_per_step"]
          for r in rows(os.path.join(sys.argv[1], "counts.jsonl"))}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.jsonl"))):
  for r in rows(f) if not f.endswith("counts.jsonl") else []:
    g = counts.get((r.get("config"), tuple(r.get("batch", ()))))
    if g and r.get("sec_per_step"):
      tf = g / r["sec_per_step"] / 1e3
      mfu = f"{tf / r['peak_tflops']:.1%}" if r.get("peak_tflops") else "-"
      print(f"{r['config']} {r['dtype']} batch {r['batch']}: {r['sec_per_step'] * 1e3:.2f} "
            f"ms/step, {g:.1f} GFLOP, {tf:.1f} TFLOP/s, MFU {mfu}")
EOF
cat "$out/summary.txt"
