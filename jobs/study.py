"""Ray job: the method study, one `domino run` per arm plus the comparison report (domino_ray/study.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/study.py --config examples/study.yaml [--output URI]

Thin on purpose: the same arguments as `domino study` (domino_ray.cli); a re-submission with the same
config skips every stage each arm has already finished and rebuilds the report.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
