-- sprintlink schema version 4: custom objects that sprintlink creates itself ([sources.object]).
-- One row per event at most (the event's primary key is the key), so an event never has two
-- objects: retries, replays, restarts and other replicas find the stored id. `sending_at` is set,
-- durably, just before the creation is sent and cleared with its outcome: a row claimed again
-- with it still set was cut off after sending (its answer is unknown).

CREATE TABLE IF NOT EXISTS objects (
    event_pk BIGINT PRIMARY KEY,
    definition_id TEXT NOT NULL,
    object_id TEXT,
    state TEXT NOT NULL,
    leads TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    due_at BIGINT,
    locked_until BIGINT NOT NULL DEFAULT 0,
    lease BIGINT NOT NULL DEFAULT 0,
    sending_at BIGINT,
    first_at BIGINT NOT NULL,
    last_error TEXT);

CREATE INDEX IF NOT EXISTS objects_due ON objects (due_at) WHERE due_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS object_attempts (
    id BIGSERIAL PRIMARY KEY,
    event_pk BIGINT NOT NULL,
    at BIGINT NOT NULL,
    status_code BIGINT,
    error TEXT,
    response_excerpt TEXT,
    duration_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL);

CREATE INDEX IF NOT EXISTS object_attempts_event ON object_attempts (event_pk, id);
