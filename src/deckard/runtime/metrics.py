"""The farm's Prometheus series, in one place: what each process counts, with labels of bounded cardinality.

Why module-level objects and the default registry: a series belongs to the process, like its logger.  In the
all-in-one farm the API, the node daemon and its broker share one process, so ``GET /metrics`` on the API shows
all of them; a node that runs alone serves them on ``node.metrics_port`` (docs/operations.md, "Metrics").

Why these labels and no others: every label value comes from a small set (phases, results, stable error codes,
route templates, image ids, node names).  User names, desktop ids, peers and raw paths never become labels: each
new value is a new series held forever by this process and by Prometheus.

Cost: an observation is a lock and an add.  The broker observes once per connect and counts relayed bytes once
per tunnel, when it closes (the tunnel already keeps the totals); nothing here runs per chunk or per packet.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest, start_http_server

# connect phases and node work span 1 ms (a warm desktop) to a minute (a cold VM start that times out)
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# a heartbeat write is a millisecond or two; hundreds of milliseconds is trouble, seconds is the lease at risk
_HEARTBEAT_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# the connect phases of the connection history (broker/session.py), ``t_<phase>_ms`` there
PHASES = ("auth", "claim", "start", "agent", "display", "total")

# ---- broker ------------------------------------------------------------------------------------------------
BROKER_CONNECTS = Counter(
    "deckard_broker_connects",
    "Connect requests by outcome once the desktop is up or the attempt ended "
    "(connected, failed, aborted, taken_over, ended)",
    ["result"],
)
TIME_TO_DESKTOP = Histogram(
    "deckard_time_to_desktop_seconds",
    "Time to desktop of successful connects, per phase (auth, claim, start, agent, display, total)",
    ["phase", "image", "node"],
    buckets=_SECONDS,
)
BROKER_TUNNELS = Gauge("deckard_broker_tunnels", "Tunnels relaying a desktop's display now")
BROKER_BYTES = Counter(
    "deckard_broker_relayed_bytes",
    "Bytes relayed by closed tunnels (in: client to desktop, out: desktop to client), counted at close",
    ["direction"],
)

# ---- node --------------------------------------------------------------------------------------------------
DESKTOP_STARTS = Counter("deckard_node_desktop_starts", "Desktop starts on this node by result", ["node", "result"])
DESKTOP_START_SECONDS = Histogram(
    "deckard_node_desktop_start_seconds",
    "Claimed start → guest started and its agent answering, successful starts",
    ["node"],
    buckets=_SECONDS,
)
DESKTOP_STOPS = Counter("deckard_node_desktop_stops", "Desktop stops on this node by result", ["node", "result"])
HEARTBEAT_SECONDS = Histogram(
    "deckard_node_heartbeat_seconds",
    "One heartbeat write (and lease read), accepted or not",
    ["node"],
    buckets=_HEARTBEAT_SECONDS,
)

# ---- placement ---------------------------------------------------------------------------------------------
PLACEMENT_DECISIONS = Counter(
    "deckard_placement_decisions",
    "Starts placed on a node (placed), given a warm guest (warm) or refused because none fits (no_node)",
    ["result"],
)

# ---- API ---------------------------------------------------------------------------------------------------
API_REQUESTS = Counter(
    "deckard_api_requests", "API requests by route template, method and status", ["route", "method", "status"]
)
API_ERRORS = Counter("deckard_api_errors", "Error answers of the API by stable error code (docs/api.md)", ["code"])


def render_metrics() -> tuple[bytes, str]:
    """This process's series in Prometheus' text format, and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


def serve_metrics(port: int, host: str) -> None:
    """Serve ``/metrics`` on its own port from a thread (a node without the API in its process)."""
    start_http_server(port, addr=host)
