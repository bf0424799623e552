-- sprintlink schema version 1: the layout of release 0.1.0.
-- Every statement is IF NOT EXISTS, so a database written by 0.1.0 (which has no
-- schema_version table) takes this version without any change to its tables.

CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT,
    received_at BIGINT NOT NULL,
    object_id TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    body TEXT NOT NULL,
    resolve_due BIGINT,
    resolve_locked_until BIGINT NOT NULL DEFAULT 0,
    resolve_lease BIGINT NOT NULL DEFAULT 0,
    resolve_attempts BIGINT NOT NULL DEFAULT 0,
    resolve_first BIGINT NOT NULL DEFAULT 0,
    UNIQUE (event_id, source));

CREATE TABLE IF NOT EXISTS links (
    id BIGSERIAL PRIMARY KEY,
    object_id TEXT NOT NULL,
    lead_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    due_at BIGINT,
    locked_until BIGINT NOT NULL DEFAULT 0,
    lease BIGINT NOT NULL DEFAULT 0,
    first_queued_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    last_error TEXT,
    UNIQUE (object_id, lead_id));

CREATE TABLE IF NOT EXISTS event_links (
    event_pk BIGINT NOT NULL,
    link_id BIGINT NOT NULL,
    PRIMARY KEY (event_pk, link_id));

CREATE TABLE IF NOT EXISTS attempts (
    id BIGSERIAL PRIMARY KEY,
    link_id BIGINT NOT NULL,
    at BIGINT NOT NULL,
    status_code BIGINT,
    error TEXT,
    response_excerpt TEXT,
    duration_ms BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS mappings (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    lead_id TEXT NOT NULL,
    PRIMARY KEY (source, key, lead_id));

CREATE TABLE IF NOT EXISTS heartbeat (id BIGINT PRIMARY KEY, at BIGINT NOT NULL);

CREATE INDEX IF NOT EXISTS events_state ON events (state, id);

CREATE INDEX IF NOT EXISTS events_source ON events (source, id);

CREATE INDEX IF NOT EXISTS events_resolve ON events (resolve_due) WHERE resolve_due IS NOT NULL;

CREATE INDEX IF NOT EXISTS links_due ON links (due_at) WHERE due_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS links_state ON links (state);

CREATE INDEX IF NOT EXISTS event_links_link ON event_links (link_id);

CREATE INDEX IF NOT EXISTS attempts_link ON attempts (link_id, id);
