"""Entry point of the synthesis job for `ray job submit` (DESIGN.md section 2).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/synthesize.py --config examples/tiny.yaml --output s3://bucket/runs/demo

Locally (starts a private single-node Ray when RAY_ADDRESS is unset):

    python jobs/synthesize.py --config examples/tiny.yaml

A killed job started again with the same config resumes: finished seed blocks are not regenerated.
`--overwrite` replaces an output written with a different config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--output", default=None, help="run root URI; overrides run.output")
    parser.add_argument("--overwrite", action="store_true", help="replace an output made with a different config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from domino_ray.config import load_config
    from domino_ray.synthesize import run_synthesize

    summary = run_synthesize(load_config(args.config, output=args.output), overwrite=args.overwrite)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
