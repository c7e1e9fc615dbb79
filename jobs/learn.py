"""Ray job: learn the domain tokens D with Ray Train (DOMINO objective), DESIGN.md sections 1-2.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/learn.py --config CFG [--output URI]

Re-submitting with the same run root resumes from the latest checkpoint under <run>/learn/.
Thin on purpose: the same arguments as `domino learn` (domino_ray.cli), which calls `domino_ray.learn.run_learn`.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["learn", *sys.argv[1:]]))
