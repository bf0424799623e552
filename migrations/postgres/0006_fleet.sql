-- sprintlink schema version 6: a fleet that respects SprintHub.
-- `delivery_control`: the deployment-wide delivery pause, one row (id = 1) at most: no row, or
-- `reason` NULL, means delivery runs; `paused_until` NULL with a reason set means paused until
-- resumed. `delivery_replicas`: one row per running replica, its heartbeat (`last_seen`) and its
-- calls in flight; live replicas (seen within the lease) split the rate limit and the concurrency.

CREATE TABLE IF NOT EXISTS delivery_control (
    id BIGINT PRIMARY KEY,
    reason TEXT,
    paused_until BIGINT,
    changed_at BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS delivery_replicas (
    replica_id TEXT PRIMARY KEY,
    joined_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    in_flight BIGINT NOT NULL DEFAULT 0);
