"""The whole pipeline on one config: encode -> (train -> eval, as they land).

  python -m jsds_jax.main --config configs/demo.py --workdir runs/demo
  jsds-run --config configs/demo.py --workdir runs/demo

Each stage is its own binary too (`jsds_jax.encode`, ...); this runner only calls their library
functions in order, so a stage that is already done (a complete feature cache) is skipped.
"""

from collections.abc import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from jsds_jax import encode



def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  dirs = encode.encode(config)
  print("Feature cache:\n" + encode.describe(dirs))


def run() -> None:
  """Console-script entry point `jsds-run`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/default", "Where checkpoints and reports go.")
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  run()
