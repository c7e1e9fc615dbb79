"""Ray job: the whole pipeline, learn -> synthesize -> finetune -> evaluate (base and fine-tuned) -> report.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --config CFG [--output URI]

Thin on purpose: parse arguments, load the config, call `domino_ray.pipeline.run_pipeline`, which
prints the summary table; a re-submission with the same config skips the stages already done.
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
    from domino_ray.pipeline import run_pipeline

    result = run_pipeline(load_config(args.config, output=args.output))
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
