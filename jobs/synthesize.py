"""Entry point of the synthesis job for `ray job submit` (DESIGN.md section 2).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/synthesize.py --config examples/tiny.yaml --output s3://bucket/runs/demo

Locally (starts a private single-node Ray when RAY_ADDRESS is unset):

    python jobs/synthesize.py --config examples/tiny.yaml

A killed job started again with the same config resumes: finished seed blocks are not regenerated.
`--overwrite` replaces an output written with a different config.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
