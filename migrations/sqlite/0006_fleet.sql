-- sprintlink schema version 6: the deployment-wide delivery pause. One row (id = 1) at most:
-- no row, or `reason` NULL, means delivery runs. `paused_until` NULL with a reason set means
-- paused until resumed. SQLite serves one replica, so there is no replica table here.

CREATE TABLE IF NOT EXISTS delivery_control (
    id BIGINT PRIMARY KEY,
    reason TEXT,
    paused_until BIGINT,
    changed_at BIGINT NOT NULL);
