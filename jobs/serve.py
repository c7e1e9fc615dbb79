"""Entry point of the synthesis service for `ray job submit` (DESIGN.md section 12).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --config examples/tiny.yaml --run s3://bucket/runs/demo --detach

`--detach` deploys the Serve application and ends the job; the application keeps serving on the
cluster (on KubeRay prefer the RayService of cluster/kuberay/rayservice.yaml). Locally, without
RAY_ADDRESS, it starts a private Ray and serves until Ctrl-C:

    python jobs/serve.py --run ./runs/tiny --port 8000
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
