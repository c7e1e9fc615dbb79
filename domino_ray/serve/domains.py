"""The domains a service serves: name -> learned representation, read once at deploy time.

A domain is named by its run (`run.name` in the run's manifest, else the last part of its URI) or
explicitly (`--run NAME=URI`, `serve.domains`). Deploying reads each representation (checking its
sha256) and its run's seed, and refuses a representation learned on another backbone than the
engine's model (the `representation.check_compatible` rule batch synthesis applies), naming the domain.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional

from domino_ray.layout import REPRESENTATION_DIR, RunLayout
from domino_ray.storage import Storage

__all__ = ["Domain", "DomainError", "parse_run_spec", "load_domains", "check_domains_fit"]

log = logging.getLogger(__name__)


class DomainError(ValueError):
    """A domain that cannot be served (missing, duplicate name, other backbone)."""


@dataclass(frozen=True)
class Domain:
    name: str
    uri: str  # the representation folder
    run: str  # run name written into records
    run_seed: int  # default request seed: served samples then equal the run's batch samples
    backbone: str
    backbone_signature: str
    hidden_size: int
    num_domain_tokens: int
    prefix: str
    representation_sha256: str
    reference_sha256: Optional[str]
    learned_at: Optional[str]
    # The draft length batch synthesis resolved for this run (synth/manifest.json), used when neither the
    # request nor `synthesize.draft.sampling.max_tokens` sets one, so served samples equal batch samples.
    draft_max_tokens: Optional[int] = None
    # ... and where its drafts end (synthesize.draft.end_at), applied to served samples the same way
    draft_end_at: str = "none"

    def public(self) -> dict[str, Any]:
        """What `GET /v1/domains` shows."""
        d = asdict(self)
        return {"name": d["name"], "backbone": d["backbone"], "P": d["num_domain_tokens"], "H": d["hidden_size"],
                "references_sha256": d["reference_sha256"], "learned_at": d["learned_at"], "run": d["run"],
                "run_seed": d["run_seed"], "representation_sha256": d["representation_sha256"], "uri": d["uri"]}


def parse_run_spec(spec: str) -> tuple[Optional[str], str]:
    """`URI` -> (None, URI); `NAME=URI` -> (NAME, URI). A URI itself never holds `=` before `://`."""
    head, sep, tail = spec.partition("=")
    if sep and "/" not in head and ":" not in head and head and tail:
        return head, tail
    return None, spec


def _run_identity(rep_dir: str, storage: Storage) -> tuple[Optional[str], int, str]:
    """(run.name, run.seed, run root) from the manifest next to the representation, when there is one."""
    suffix = "/" + REPRESENTATION_DIR
    root = rep_dir.rstrip("/")[: -len(suffix)] if rep_dir.rstrip("/").endswith(suffix) else rep_dir
    manifest = RunLayout(root).manifest
    if storage.exists(manifest):
        run = (storage.read_json(manifest).get("config") or {}).get("run") or {}
        return run.get("name"), int(run.get("seed", 0)), root
    return None, 0, root


def _synth_draft_settings(root: str, storage: Storage) -> dict[str, Any]:
    """The draft length and end rule batch synthesis used (`<run>/synth/manifest.json`), if it ran."""
    manifest = RunLayout(root).synth_manifest
    if not storage.exists(manifest):
        return {}
    data = storage.read_json(manifest)
    value = data.get("draft_max_tokens")
    end_at = (((data.get("config") or {}).get("synthesize") or {}).get("draft") or {}).get("end_at") or "none"
    return {"draft_max_tokens": int(value) if value else None, "draft_end_at": end_at}


def _domain(name: Optional[str], uri: str, storage: Storage) -> Domain:
    from domino_ray.representation import load_representation

    rep = load_representation(uri, storage)  # checks shape and sha256
    run_name, run_seed, root = _run_identity(rep.uri, storage)
    meta = rep.meta
    folder = root.rstrip("/").rsplit("/", 1)[-1]
    return Domain(
        name=name or run_name or folder, uri=rep.uri, run=run_name or name or folder, run_seed=run_seed,
        backbone=rep.backbone,
        backbone_signature=str(meta.get("backbone_signature")), hidden_size=rep.hidden_size,
        num_domain_tokens=rep.num_domain_tokens, prefix=rep.prefix, representation_sha256=rep.sha256,
        reference_sha256=meta.get("reference_sha256"), learned_at=meta.get("created_at"),
        **_synth_draft_settings(root, storage))


def load_domains(runs: Iterable[str], mapping: Optional[Mapping[str, str]] = None,
                 storage: Optional[Storage] = None) -> dict[str, Domain]:
    """Domains of `--run` specs plus an explicit name -> URI mapping; names must be unique."""
    storage = storage or Storage()
    specs = [parse_run_spec(s) for s in runs] + list((mapping or {}).items())
    if not specs:
        raise DomainError("no domains to serve: pass --run RUN (a run root with a learned representation) at least once")
    out: dict[str, Domain] = {}
    for name, uri in specs:
        try:
            domain = _domain(name, uri, storage)
        except (FileNotFoundError, ValueError) as e:
            raise DomainError(f"domain {name or uri!r}: {e}") from e
        if domain.name in out:
            raise DomainError(f"two domains are named {domain.name!r} ({out[domain.name].uri} and {domain.uri}); name "
                              f"them apart with --run NAME=URI")
        out[domain.name] = domain
    return out


def check_domains_fit(domains: Mapping[str, Domain], model: str, trust_remote_code: bool = False) -> None:
    """Raise DomainError naming every domain whose D does not fit `model` (H, backbone signature)."""
    from transformers import AutoConfig

    from domino_ray.backbone import backbone_signature
    from domino_ray.representation import signature_conflict

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    signature, hidden = backbone_signature(config, weights=model), int(config.hidden_size)
    bad = [f"{d.name} (learned on {d.backbone!r}, H={d.hidden_size}, signature {d.backbone_signature})"
           for d in domains.values()
           if d.hidden_size != hidden or signature_conflict(d.backbone_signature, signature)]
    if bad:
        raise DomainError(f"the engine model {model!r} (H={hidden}, signature {signature}) cannot serve: "
                          f"{'; '.join(bad)}. One service holds one backbone; serve these from another deployment "
                          f"or re-run `domino learn` on {model}")
