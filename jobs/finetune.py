"""Ray job: SFT on the accepted synthetic records (LoRA or full), DESIGN.md section 2.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py --config CFG [--output URI]

Thin on purpose: the same arguments as `domino finetune` (domino_ray.cli), which calls `domino_ray.finetune.run_finetune`.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
