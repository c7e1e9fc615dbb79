#!/bin/sh
# Smoke check of the cluster image (cluster/Dockerfile copies it to /app/smoke.sh). Run it on a new
# image before pushing, with the sandbox pods' container settings:
#
#   docker run --rm --cap-add SYS_ADMIN --cap-add NET_ADMIN --security-opt seccomp=unconfined \
#       --security-opt apparmor=unconfined ghcr.io/domino-ray/domino-ray:0.1.0 sh /app/smoke.sh
#
# and on the cluster, in a sandbox pod: kubectl -n domino exec POD -- sh /app/smoke.sh
# It checks that the package and vLLM import, that bubblewrap is installed, and runs one program in
# the sandbox with sandbox.strict (every isolation layer must hold, else it says which is missing).
# Exit status 0 = all good. tests/test_cluster.py runs it against the test environment.
set -eu
python3 -c "import domino_ray, ray, vllm; print('imports ok: domino_ray, ray', ray.__version__, 'vllm', vllm.__version__)"
bwrap --version
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
printf 'import sys\nprint(sum(range(10)), sys.version_info[0])\n' > "$dir/smoke.py"
python3 -m domino_ray sandbox exec --strict --json --file "$dir/smoke.py" > "$dir/result.json" 2> "$dir/error.txt" || {
    status=$?
    cat "$dir/error.txt" "$dir/result.json" >&2 || true
    # what the container lacks, from bubblewrap's own message (domino_ray/placement.py)
    python3 - "$dir/error.txt" >&2 <<'PY'
import sys
from domino_ray.placement import explain_isolation_failure
hint = explain_isolation_failure(open(sys.argv[1]).read())
print("smoke: the sandbox refused to start: " + (hint or "see the message above"))
PY
    exit "$status"
}
python3 - "$dir/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "passed" and r["stdout"].split() == ["45", "3"], r
iso = r["isolation"]
print("sandbox ok:", iso["backend"], "layers:", ",".join(k for k, v in iso["layers"].items() if v),
      "missing:", ",".join(iso["missing"]) or "none")
PY
echo "smoke: all checks passed"
