"""Where a shard's requests go and how they fare there, one concept a module:

- `routing`: each model alias's endpoint (the node's own server, or the model's remote provider);
- `sizing`: how many requests each worker keeps in flight there, and how many workers a node runs;
- `pacing`: the pace that keeps a provider's request and token quotas;
- `watch`: the causes of failed requests, and the watch that stops a job whose endpoint fails for good;
- `preflight`: before any work, a remote provider's key, models and endpoint, and the job's servers' weights.

What the rest of the job uses is here. The function `preflight` is not re-exported: its name is its module's
(`from sdg_job.endpoints.preflight import preflight`).
"""

from sdg_job.endpoints.pacing import Pace, shared_pace
from sdg_job.endpoints.preflight import check_outside, provider_message, redact, served_models, transport_cause
from sdg_job.endpoints.routing import Endpoint, Routes, own_endpoint, remote_endpoint, remote_endpoints, route_models
from sdg_job.endpoints.sizing import REMOTE_CONCURRENCY, concurrency, expected_nodes, worker_share
from sdg_job.endpoints.watch import (
    CAUSES,
    INCURABLE_AFTER_S,
    OTHER_KINDS,
    REQUEST_CAUSES,
    EndpointFailing,
    EndpointWatch,
    failing_message,
    request_cause,
)

__all__ = [
    "CAUSES", "INCURABLE_AFTER_S", "OTHER_KINDS", "REMOTE_CONCURRENCY", "REQUEST_CAUSES", "Endpoint",
    "EndpointFailing", "EndpointWatch", "Pace", "Routes", "check_outside", "concurrency", "expected_nodes",
    "failing_message", "own_endpoint", "provider_message", "redact", "remote_endpoint", "remote_endpoints",
    "request_cause", "route_models", "served_models", "shared_pace", "transport_cause", "worker_share",
]  # fmt: skip
