"""The synthesis service: learned domains served on demand with Ray Serve (DESIGN.md section 12).

`domino serve --run RUN` deploys it; `docs/serve.md` shows the HTTP API. This package imports no Ray,
torch or vLLM at import time: `app` and `deployments` bring Ray Serve in when a service is built.
"""

from domino_ray.serve.api import ApiError, SamplesRequest, CompletionRequest, sample_specs
from domino_ray.serve.domains import Domain, DomainError, load_domains

__all__ = ["ApiError", "SamplesRequest", "CompletionRequest", "sample_specs", "Domain", "DomainError",
           "load_domains", "build_app", "app_builder", "run_service"]


def __getattr__(name):  # lazy: Ray Serve only when a service is built
    if name in ("build_app", "app_builder", "run_service"):
        from domino_ray.serve import app

        return getattr(app, name)
    raise AttributeError(name)
