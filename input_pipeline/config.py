"""Default `data` config block; training configs can start from it and override fields."""
import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """The data fields read by `input_pipeline.prepare.prepare` (see README.md)."""
  c = ml_collections.ConfigDict()
  c.layout = "toy"            # 'brats' | 'dataset_json' | 'toy'
  c.root = ""                 # brats: folder holding <name>/<name>_<seq>.nii.gz
  c.train_csv = ""            # split CSVs, lines `name,mask` (mask = availability bits)
  c.valid_csv = ""
  c.test_csv = ""
  c.dataset_json = ""         # dataset_json layout: the description file
  c.sequences = ("t1", "t1ce", "t2", "flair")  # code order; must match the mask digits
  c.cache_dir = "/tmp/seq2seq_jax_cache"
  c.depth = 128               # central slices kept when a volume has more (0: keep all)
  c.normalization = "official"
  c.dtype = "float16"         # storage: float16 | int16 | float32
  c.on_error = "raise"        # 'raise' | 'skip' (skip bad subjects with a warning)
  c.num_workers = 0           # processes for preprocessing; 0: one per CPU core
  c.records_per_shard = 64
  c.toy_subjects = 100
  c.toy_size = 64
  c.toy_seed = 0
  c.toy_dynamic = False
  return c
