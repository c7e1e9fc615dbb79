"""Where work may run on a cluster: the custom Ray resource of sandbox-capable nodes, and what a failed
sandbox start-up check means in terms of the container's capabilities. Pure logic, no Ray import.

Untrusted code (the sandbox pool of `evaluate`, the `synthesize.execute` pool) runs only on nodes that
offer the Ray resource `sandbox`: the KubeRay `cpu` group and the AWS `cpu_worker` nodes, whose
containers get the capabilities bubblewrap needs, and the local single-node Ray that `domino` and
the tests start. Each sandbox actor asks for `SANDBOX_PER_ACTOR` of it (a label, not a quantity: a
node offering `sandbox: 1` hosts up to 100 sandbox actors; CPUs bound them long before that).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

__all__ = [
    "SANDBOX_RESOURCE",
    "SANDBOX_PER_ACTOR",
    "SANDBOX_NODE_AMOUNT",
    "local_node_resources",
    "explain_isolation_failure",
    "missing_resources",
]

SANDBOX_RESOURCE = "sandbox"  # offered by sandbox-capable nodes only (cluster/ manifests, local Ray)
SANDBOX_PER_ACTOR = 0.01      # what one sandbox actor requests
SANDBOX_NODE_AMOUNT = 1.0     # what a sandbox-capable node offers


def local_node_resources() -> dict[str, float]:
    """Custom resources of a single-node Ray that this package starts itself (`domino run` without
    RAY_ADDRESS, the test cluster): that node runs everything, sandboxes included, so it offers the
    sandbox resource. Whether the sandbox really works there is the sandbox's own start-up check."""
    return {SANDBOX_RESOURCE: SANDBOX_NODE_AMOUNT}


def missing_resources(wanted: Mapping[str, float], nodes: list[Mapping[str, float]]) -> list[str]:
    """Custom resources of `wanted` that no node in `nodes` (each node's total resources) offers
    enough of for one actor; CPU, GPU and memory are left to Ray's own checks."""
    builtin = {"CPU", "GPU", "memory", "object_store_memory"}
    return sorted(name for name, amount in wanted.items()
                  if name not in builtin and not any(node.get(name, 0.0) >= amount for node in nodes))


# bubblewrap's own messages (bubblewrap 0.8, reproduced by tests/test_placement.py with the capability
# dropped) -> what the container lacks. Order matters: the first match wins.
_BWRAP_FAILURES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"loopback: Failed RTM_NEW(ADDR|LINK)|Failed to set up loopback|RTNETLINK", re.I),
     "CAP_NET_ADMIN: as root, bubblewrap's --unshare-net configures the loopback device of the new "
     "network namespace, which needs NET_ADMIN (Kubernetes: securityContext.capabilities.add "
     "[SYS_ADMIN, NET_ADMIN], as in cluster/kuberay/raycluster.yaml's cpu group; docker: --cap-add NET_ADMIN)"),
    (re.compile(r"(Creating new namespace|unshare|clone).*(Operation not permitted|EPERM)", re.I),
     "CAP_SYS_ADMIN (or a seccomp profile that allows unshare/clone with namespace flags): bubblewrap "
     "creates mount, pid, ipc, uts and network namespaces (Kubernetes: securityContext.capabilities.add "
     "SYS_ADMIN and seccompProfile Unconfined; docker: --cap-add SYS_ADMIN --security-opt seccomp=unconfined)"),
    (re.compile(r"(mount|make / slave|pivot_root|remount).*(Permission denied|EACCES)", re.I),
     "an AppArmor (or SELinux) profile allowing mount: the container runtime's default AppArmor profile "
     "denies mount even with SYS_ADMIN (Kubernetes: securityContext.appArmorProfile Unconfined; "
     "docker: --security-opt apparmor=unconfined)"),
    (re.compile(r"(Can't mount proc|mount proc|Can't mount tmpfs|mount).*(Operation not permitted|EPERM)", re.I),
     "CAP_SYS_ADMIN for mount (or unmasked /proc): bubblewrap mounts a fresh /proc and tmpfs in the new "
     "namespaces (Kubernetes: capabilities.add SYS_ADMIN; docker: --cap-add SYS_ADMIN)"),
    (re.compile(r"No permissions to creating new namespace|user namespaces? .*disabled|max_user_namespaces", re.I),
     "user namespaces (not running as root and the kernel refuses unprivileged user namespaces): run the "
     "sandbox pods as root with SYS_ADMIN and NET_ADMIN instead"),
]


def explain_isolation_failure(message: str) -> Optional[str]:
    """What the container lacks, given the error text of a failed bubblewrap start-up probe, or None
    when the text is not one of bubblewrap's known permission failures."""
    for pattern, missing in _BWRAP_FAILURES:
        if pattern.search(message or ""):
            return f"missing {missing}"
    return None
