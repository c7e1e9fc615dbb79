"""Ray job: pass@k of a model on the configured benchmark (LLM actors -> sandbox actors), DESIGN.md section 2.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --config CFG \
        [--output URI] [--model MODEL] [--lora ADAPTER_DIR] [--name NAME]

Writes <run>/eval/<name>/results.parquet and summary.json and prints the summary. Every worker node
needs bubblewrap and util-linux for the sandbox (`sandbox.strict: true` refuses to run without them).
Thin on purpose: parse arguments, load the config, call `domino_ray.evaluate.run_evaluate`.
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
    parser.add_argument("--model", default=None, help="model to evaluate (default: evaluate.engine.model or the backbone)")
    parser.add_argument("--lora", default=None, help="LoRA adapter directory to apply")
    parser.add_argument("--name", default=None, help="result name under <run>/eval/ (default: derived from the model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from domino_ray.config import load_config
    from domino_ray.evaluate import run_evaluate

    cfg = load_config(args.config, output=args.output)
    summary = run_evaluate(cfg, model=args.model, lora=args.lora, name=args.name)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
