"""Ray connection for jobs: join the cluster `ray job submit` points at, or start a local one."""

from __future__ import annotations

import logging
import os

__all__ = ["ensure_ray"]

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect once. Under `ray job submit` RAY_ADDRESS is set and we join that cluster; otherwise a
    local single-node cluster is started (never `address="auto"` blindly: that would join any
    cluster already running on the machine)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        from domino_ray.placement import local_node_resources

        # this one node runs everything, untrusted code too: it offers the sandbox resource
        ray.init(address="local", num_cpus=num_cpus, resources=local_node_resources())
    log.info("ray: %s", ray.cluster_resources())
