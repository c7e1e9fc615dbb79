"""Ray job: learn the domain tokens D with Ray Train (DOMINO objective), DESIGN.md sections 1-2.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/learn.py --config CFG [--output URI]

Re-submitting with the same run root resumes from the latest checkpoint under <run>/learn/.
Thin on purpose: parse arguments, load the config, call `domino_ray.learn.run_learn`.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output", default=None, help="run root URI; overrides run.output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from domino_ray.config import load_config
    from domino_ray.learn import run_learn

    print(json.dumps(run_learn(load_config(args.config, output=args.output)), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
