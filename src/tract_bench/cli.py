"""`tract-train`: the Hydra entry point. Composes conf/, trains one run per job, turns bad input into exit 2."""

import sys

import hydra

from tract_bench.config import config_dir, register_resolvers
from tract_bench.errors import UserError

register_resolvers()


@hydra.main(version_base=None, config_path=config_dir(), config_name="train")
def main(cfg):
    from tract_bench.train import run  # imported here so `--help` and config errors stay fast

    try:
        run(cfg)
    except UserError as e:
        print(f"tract-train: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
