"""Every Prometheus metric of a pod, declared once; no user, customer or channel ids as labels."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

NAMESPACE: Final = "eva_ws"

# One registry per process, so tests that build several apps do not collide on names.
REGISTRY: Final = CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... (read from /proc
# at scrape time), as every Prometheus client exports them.
ProcessCollector(registry=REGISTRY)

CONNECTIONS_ACTIVE: Final = Gauge(
    "connections_active", "Open WebSocket connections on this pod.", namespace=NAMESPACE, registry=REGISTRY
)
CONNECTIONS_OPENED: Final = Counter(
    "connections_opened_total", "WebSocket connections accepted.", namespace=NAMESPACE, registry=REGISTRY
)
HANDSHAKES_REJECTED: Final = Counter(
    "handshakes_rejected_total",
    "Upgrade requests refused before the socket opened, by reason.",
    ["reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RECONNECTS: Final = Counter(
    "reconnects_total",
    "Connections that resumed an earlier session (a subscribe carrying a position, or ?reconnect=N).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
DISCONNECTS: Final = Counter(
    "disconnects_total",
    "Closed connections by close reason (see docs/protocol.md).",
    ["reason"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CONNECTION_DURATION: Final = Histogram(
    "connection_duration_seconds",
    "How long WebSocket connections stayed open.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
)
MESSAGES_RECEIVED: Final = Counter(
    "messages_received_total", "Client messages received, by type.", ["type"], namespace=NAMESPACE, registry=REGISTRY
)
MESSAGES_SENT: Final = Counter(
    "messages_sent_total", "Messages queued to clients, by type.", ["type"], namespace=NAMESPACE, registry=REGISTRY
)
ERRORS: Final = Counter(
    "errors_total", "Error replies sent to clients, by code.", ["code"], namespace=NAMESPACE, registry=REGISTRY
)
EVENTS_CONFLATED: Final = Counter(
    "events_conflated_total",
    "Queued transaction_update events replaced by a newer update of the same transaction.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PUBLISHED: Final = Counter(
    "published_total",
    "Events published through this pod, by result (ok, duplicate, invalid, unavailable).",
    ["result"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PUBLISH_DURATION: Final = Histogram(
    "publish_duration_seconds",
    "Time for the broker to accept one publish (history append + fan-out).",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
DELIVERY_LAG: Final = Histogram(
    "delivery_lag_seconds",
    "From an event's publish timestamp to its fan-out on this pod.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
EVENTS_REPLAYED: Final = Counter(
    "events_replayed_total",
    "Events sent from history (resume or gap repair) instead of live.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RESUMES: Final = Counter(
    "resumes_total",
    "Subscribe requests carrying a position, by outcome (recovered, unrecovered, refused by the user's resume budget).",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RESUME_BUDGET_WAITS: Final = Counter(
    "resume_budget_waits_total",
    "Resumes and snapshots that waited for their user's resume budget before reading.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
HUB_CHANNELS: Final = Gauge(
    "hub_channels", "Channels with at least one local subscription.", namespace=NAMESPACE, registry=REGISTRY
)
HUB_SUBSCRIPTIONS: Final = Gauge(
    "hub_subscriptions", "Client subscriptions on this pod.", namespace=NAMESPACE, registry=REGISTRY
)
BROKER_READY: Final = Gauge(
    "broker_ready", "1 while the broker's live delivery can be trusted.", namespace=NAMESPACE, registry=REGISTRY
)
BROKER_CANARY_LAG: Final = Gauge(
    "broker_canary_lag_seconds",
    "Age of the newest canary that came back through Redis to this pod (about the canary interval while healthy).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
BROKER_CONNECTS: Final = Counter(
    "broker_connects_total",
    "Broker (re)connections to Redis, by outcome (ok, failed).",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
# kind="client": channels this pod's clients subscribed to (equals eva_ws_hub_channels);
# kind="internal": channels between pods (control commands, inspect queries, presence events).
BROKER_SUBSCRIPTIONS_WANTED: Final = Gauge(
    "broker_subscriptions_wanted",
    "Channels this pod wants from Redis, by kind (client, internal).",
    ["kind"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
BROKER_SUBSCRIPTIONS_ACTUAL: Final = Gauge(
    "broker_subscriptions_actual",
    "Channels whose Redis subscription is in effect, by kind (client, internal).",
    ["kind"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PRESENCE_UNAVAILABLE: Final = Counter(
    "presence_unavailable_total",
    "Presence updates or reads that failed because Redis could not answer, by operation (add, remove, list).",
    ["operation"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PRESENCE_ANNOUNCEMENTS: Final = Counter(
    "presence_announcements_total",
    "presence_join / presence_leave announcements by outcome: published, dropped (the pod's queue was full),"
    " lost (Redis could not take them).",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
BROKER_INVALID_MESSAGES: Final = Counter(
    "broker_invalid_messages_total",
    "Messages on a subscribed channel that were not valid events (dropped, logged).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
REBALANCE_SHED: Final = Counter(
    "rebalance_shed_total",
    "Connections closed with 4013 because this pod held more than its share.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
REBALANCE_CLUSTER_PODS: Final = Gauge(
    "rebalance_cluster_pods", "Live pods in the last rebalance report.", namespace=NAMESPACE, registry=REGISTRY
)
REBALANCE_CLUSTER_CONNECTIONS: Final = Gauge(
    "rebalance_cluster_connections",
    "Connections of all live pods in the last rebalance report.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CONNECTION_CAPS_UNAVAILABLE: Final = Counter(
    "connection_caps_unavailable_total",
    "Connection-cap checks Redis could not answer; the connection was let in.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
EVENT_LOOP_LAG: Final = Histogram(
    "event_loop_lag_seconds",
    "How much later than asked a timer ran on the event loop, sampled ten times a second.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
GC_PAUSE: Final = Histogram(
    "gc_pause_seconds",
    "Pauses of Python's cycle collector, by generation (0, 1, 2).",
    ["generation"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
CONTROL_REQUESTS: Final = Counter(
    "control_requests_total",
    "Control commands asked of this pod (POST /api/v1/disconnect, revoke, unsubscribe), by command and outcome.",
    ["command", "outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CONTROL_COMMANDS_APPLIED: Final = Counter(
    "control_commands_applied_total",
    "Control commands this pod received from the control channel and applied, by command.",
    ["command"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CONTROL_SOCKETS_AFFECTED: Final = Counter(
    "control_sockets_affected_total",
    "Sockets closed (disconnect, revoke) or subscriptions ended (unsubscribe) on this pod by control commands.",
    ["command"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTBOX_READY: Final = Gauge(
    "outbox_ready",
    "1 while this pod's outbox relay is connected to PostgreSQL and listening (EVA_WS_OUTBOX_DSN), else 0.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTBOX_DEPTH: Final = Gauge(
    "outbox_depth_rows",
    "Rows in eva_ws_outbox (committed, not yet relayed), read by this pod's relay at most once per poll interval.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTBOX_OLDEST_AGE: Final = Gauge(
    "outbox_oldest_age_seconds",
    "Age of the oldest row in eva_ws_outbox (0 when empty), read with outbox_depth_rows.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
OUTBOX_RELAY_LAG: Final = Histogram(
    "outbox_relay_lag_seconds",
    "From a row's insert (PostgreSQL's clock) to its publish into the broker by this pod.",
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
OUTBOX_RELAYED: Final = Counter(
    "outbox_relayed_total",
    "Outbox rows this pod relayed, by outcome: published (into the broker), rejected (to eva_ws_outbox_rejected).",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
