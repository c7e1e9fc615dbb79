"""Ray job: the whole pipeline, learn -> synthesize -> finetune -> evaluate (base and fine-tuned) -> report.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --config CFG [--output URI]

Thin on purpose: the same arguments as `domino run` (domino_ray.cli), which calls
`domino_ray.pipeline.run_pipeline`; it prints the summary table; a re-submission with the same config skips the stages already done.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
