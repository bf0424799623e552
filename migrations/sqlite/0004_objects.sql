-- sprintlink schema version 4: custom objects that sprintlink creates itself ([sources.object]).
-- One row per event at most (the event's primary key is the key), so an event never has two
-- objects: retries, replays, restarts and other replicas find the stored id. `sending_at` is set,
-- durably, just before the creation is sent and cleared with its outcome: a row claimed again
-- with it still set was cut off after sending (its answer is unknown).

CREATE TABLE IF NOT EXISTS objects (
    event_pk INTEGER PRIMARY KEY,
    definition_id TEXT NOT NULL,
    object_id TEXT,
    state TEXT NOT NULL,
    leads TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at INTEGER,
    locked_until INTEGER NOT NULL DEFAULT 0,
    lease INTEGER NOT NULL DEFAULT 0,
    sending_at INTEGER,
    first_at INTEGER NOT NULL,
    last_error TEXT);

CREATE INDEX IF NOT EXISTS objects_due ON objects (due_at) WHERE due_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS object_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_pk INTEGER NOT NULL,
    at INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT,
    response_excerpt TEXT,
    duration_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL);

CREATE INDEX IF NOT EXISTS object_attempts_event ON object_attempts (event_pk, id);
