"""Throughput of the toy generator, preprocessing and the training loader.

`python -m input_pipeline.benchmark [--subjects 200 --size 64 --workdir DIR]` prints one JSON
line per measurement: toy generation and preprocessing in subjects/s, then loader batches/s
for a 2.5D and a 3D crop configuration (after a warm-up batch).
"""
import argparse
import json
import os
import shutil
import tempfile
import time

from input_pipeline import config, loader, prepare, toy


def _loader_rate(d, batches, **kw):
  it = loader.make_train_iterator(d, seed=0, process_index=0, process_count=1, **kw)
  next(it)  # warm-up: thread start and first decode
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t
  it.close()
  return dict(batches_per_s=round(batches / dt, 1),
              examples_per_s=round(batches * kw["batch_size"] / dt, 1),
              src_shape=list(b["src"].shape))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--subjects", type=int, default=200)
  ap.add_argument("--size", type=int, default=64)
  ap.add_argument("--batches", type=int, default=200)
  ap.add_argument("--num_workers", type=int, default=0, help="0: one per CPU core")
  ap.add_argument("--workdir", default="")
  a = ap.parse_args(argv)
  work = a.workdir or tempfile.mkdtemp(prefix="ip_bench_")
  cores = os.cpu_count()
  try:
    root = os.path.join(work, "toy")
    t = time.perf_counter()
    toy.make_toy_dataset(root, a.subjects, seed=0, size=a.size, num_workers=a.num_workers,
                         progress=False)
    dt = time.perf_counter() - t
    print(json.dumps(dict(stage="toy", subjects=a.subjects, size=a.size, cores=cores,
                          seconds=round(dt, 2), subjects_per_s=round(a.subjects / dt, 1))))
    c = config.default_data_config()
    c.layout, c.root, c.cache_dir, c.num_workers = "brats", root, work, a.num_workers
    for s in ("train", "valid", "test"):
      c[f"{s}_csv"] = os.path.join(root, f"{s}.csv")
    t = time.perf_counter()
    d = prepare.prepare(c, os.path.join(work, "prepared"))
    dt = time.perf_counter() - t
    print(json.dumps(dict(stage="prepare", subjects=a.subjects, size=a.size, cores=cores,
                          seconds=round(dt, 2), subjects_per_s=round(a.subjects / dt, 1))))
    h = min(a.size, 64)
    runs = [dict(ndims=2, c_in=3, crop_size=[1, h, h], batch_size=8, rep_step=8),
            dict(ndims=3, c_in=1, crop_size=[h // 2] * 3, batch_size=2, rep_step=8)]
    for kw in runs:
      rate = _loader_rate(d, a.batches, num_codes=4, **kw)
      print(json.dumps(dict(stage="loader", ndims=kw["ndims"], crop_size=kw["crop_size"],
                            batch_size=kw["batch_size"], rep_step=kw["rep_step"], **rate)))
  finally:
    if not a.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
