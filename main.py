"""seq2seq_jax entry point.

    python main.py --config=configs/toy.py --workdir=/tmp/toy            # train (default)
    python main.py --config=configs/brats2d.py --workdir=DIR --config.train.lr=1e-4
    python main.py --config=configs/toy.py --workdir=/tmp/toy --mode=evaluate [--save_predictions]
    python main.py --config=configs/toy.py --workdir=/tmp/toy --mode=predict \
        --input=SUBJECT_DIR_OR_FILES --output=OUT_DIR [--md]

Multi-host (TPU pods, several GPU hosts): pass --multihost so that
jax.distributed.initialize() runs first (coordinator from the environment or the flags).
"""

if __name__ == "__main__":
  # Before anything heavy is imported: may restart this process once with glibc malloc's
  # huge pages on (XLA CPU's per-step buffers then fault in 2 MB at a time; host_memory.py).
  from seq2seq_jax import host_memory
  host_memory.use_malloc_huge_pages()

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from seq2seq_jax import host_memory

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict"],
                  "train; evaluate (test split → WORKDIR/eval/); predict (a new subject).")
flags.DEFINE_integer("checkpoint_step", None, "evaluate/predict: checkpoint step (default: "
                     "the best by validation PSNR).")
flags.DEFINE_bool("save_predictions", False, "evaluate: also write the predictions as NIfTI.")
flags.DEFINE_string("input", None, "predict: a subject folder or comma-separated NIfTI files.")
flags.DEFINE_string("output", None, "predict: output folder.")
flags.DEFINE_bool("md", False, "predict: also write the M_d maps of the present sequences.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before any device is touched: XLA reads XLA_FLAGS when its backend starts.
  host_memory.configure_cpu_host(FLAGS.config.train)
  if FLAGS.multihost or FLAGS.coordinator_address:
    # CPU-only runs (tests, debugging on one machine) need a collectives backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  if FLAGS.mode == "evaluate":
    from seq2seq_jax import evaluate
    summary = evaluate.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint_step,
                                FLAGS.save_predictions)
    print(evaluate.format_contribution(summary.pop("contribution")))
  elif FLAGS.mode == "predict":
    if not FLAGS.input or not FLAGS.output:
      raise app.UsageError("--mode=predict needs --input and --output")
    from seq2seq_jax import predict
    summary = predict.predict(FLAGS.config, FLAGS.workdir, FLAGS.input, FLAGS.output,
                              FLAGS.checkpoint_step, FLAGS.md)
  else:
    from seq2seq_jax import train  # after distributed init
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print("done:", summary)


if __name__ == "__main__":
  app.run(main)
