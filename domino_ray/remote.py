"""Heavy work off the driver: run a function as a Ray task on a worker with the resources it needs,
and the Ray arguments that keep untrusted code on sandbox-capable nodes.

On a cluster the driver runs on the head, which is sized for the GCS and the job driver, not for a
7B model: loading one there (~15 GB in bf16, twice that in fp32) kills the head and with it the
cluster. So whatever loads a model outside the Ray Train and Ray Data workers goes through
`run_on_worker`:

    merged = run_on_worker(merge_fn, base, adapter, num_gpus=1, memory_gb=40, name="finetune-merge")

The task asks for at least one CPU (the head of the cluster manifests offers none, so it cannot
land there), a GPU when asked for (`num_gpus="auto"`: one when the cluster has one now), and
`memory_gb` of Ray's memory resource, so the scheduler (and the autoscaler) pick a node that fits.
Ray is imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, TypeVar, Union

from domino_ray.placement import missing_resources

__all__ = ["run_on_worker", "where_am_i", "sandbox_remote_args"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_warned: set[str] = set()


def where_am_i() -> dict[str, Any]:
    """Node id, pid and host of the calling process (inside a Ray task: the worker's)."""
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node, "pid": os.getpid(), "host": socket.gethostname()}


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def run_on_worker(fn: Callable[..., T], *args: Any, num_cpus: float = 1.0, num_gpus: Union[float, str] = "auto",
                  memory_gb: Optional[float] = None, name: Optional[str] = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` as one Ray task on a worker; blocks and returns its result (its
    exception re-raised here). `fn` must be importable on the workers (a module-level function of
    this package). num_gpus="auto" is 1 when the cluster has a GPU right now, else 0; on an
    autoscaling cluster whose GPU workers may be scaled to zero, pass 1 explicitly."""
    import ray

    from domino_ray.runtime import ensure_ray

    ensure_ray()
    if num_cpus <= 0:
        raise ValueError(f"run_on_worker: num_cpus must be > 0 (got {num_cpus}); a task without CPUs could run on the head")
    gpus = (1.0 if _cluster_gpus() >= 1 else 0.0) if num_gpus == "auto" else float(num_gpus)
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": gpus, "max_retries": 2,  # node losses (spot); exceptions are not retried
                              
                               "name": name or getattr(fn, "__qualname__", "run_on_worker")}
    if memory_gb:
        options["memory"] = int(memory_gb * 1024**3)
    log.info("%s: running as a Ray task (%s CPU, %s GPU%s)", options["name"], num_cpus, gpus,
             f", {memory_gb} GiB" if memory_gb else "")
    task = ray.remote(_call).options(**options)
    return ray.get(task.remote(fn, args, kwargs))


def _call(fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    return fn(*args, **kwargs)


def sandbox_remote_args(pool: Any) -> dict[str, Any]:
    """Ray arguments for a pool of actors that run untrusted code: its `resources` (by default a
    small share of the `sandbox` resource that only sandbox-capable nodes offer). Warns once when
    no live node offers them: the actors then wait until a node that does joins (the autoscaler
    adds one from a group that declares the resource), which on a fixed cluster is forever."""
    resources = dict(getattr(pool, "resources", None) or {})
    if not resources:
        return {}
    try:
        import ray

        if ray.is_initialized():
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            missing = [m for m in missing_resources(resources, nodes) if m not in _warned]
            for name in missing:
                _warned.add(name)
                log.warning(
                    "no live Ray node offers the resource %r that the sandbox actors ask for (%s): they wait until a "
                    "node that offers it joins. Sandbox-capable nodes declare it (cluster/kuberay/raycluster.yaml cpu "
                    "group, cluster/aws/cluster.yaml cpu_worker; `ray start --resources='{\"%s\": 1}'`), or set "
                    "the pool's resources to {} to run untrusted code on any node.", name, resources, name)
    except Exception as e:  # a failed check must not stop the job; Ray reports infeasible actors itself
        log.debug("sandbox resource check skipped: %s", e)
    return {"resources": resources}
