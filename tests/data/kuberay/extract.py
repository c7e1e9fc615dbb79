"""Rebuild the schema files of this folder from a clone of ray-project/kuberay:

    git clone https://github.com/ray-project/kuberay && python tests/data/kuberay/extract.py kuberay v1.6.2 v1.7.0

For each tag, each CRD of ray-operator/config/crd/bases/ (RayCluster, RayJob, RayService) keeps
the openAPIV3Schema of its `v1` version with `status` dropped (the manifests never set it), as
compact gzipped JSON: <tag>/<kind>.schema.json.gz.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}


def main(repo: str, *tags: str) -> None:
    for tag in tags:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", f"{tag}^{{commit}}"], capture_output=True,
                                text=True, check=True).stdout.strip()
        out = HERE / tag
        out.mkdir(exist_ok=True)
        for kind, name in CRDS.items():
            text = subprocess.run(["git", "-C", repo, "show", f"{tag}:ray-operator/config/crd/bases/{name}"],
                                  capture_output=True, text=True, check=True).stdout
            crd = yaml.safe_load(text)
            (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            schema = version["schema"]["openAPIV3Schema"]
            schema["properties"].pop("status", None)
            schema["x-domino-source"] = {"repo": "https://github.com/ray-project/kuberay", "tag": tag, "commit": commit,
                                         "path": f"ray-operator/config/crd/bases/{name}", "license": "Apache-2.0"}
            data = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
            with gzip.GzipFile(out / f"{kind}.schema.json.gz", "wb", mtime=0) as f:
                f.write(data)
            print(tag, kind, len(data), "bytes")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
