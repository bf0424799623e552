-- sprintlink schema version 1: the layout of release 0.1.0.
-- Every statement is IF NOT EXISTS, so a database written by 0.1.0 (which has no
-- schema_version table) takes this version without any change to its tables.

CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT,
    received_at INTEGER NOT NULL,
    object_id TEXT,
    state TEXT NOT NULL,
    reason TEXT,
    body TEXT NOT NULL,
    resolve_due INTEGER,
    resolve_locked_until INTEGER NOT NULL DEFAULT 0,
    resolve_lease INTEGER NOT NULL DEFAULT 0,
    resolve_attempts INTEGER NOT NULL DEFAULT 0,
    resolve_first INTEGER NOT NULL DEFAULT 0,
    UNIQUE (event_id, source));

CREATE TABLE IF NOT EXISTS links (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    object_id TEXT NOT NULL,
    lead_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at INTEGER,
    locked_until INTEGER NOT NULL DEFAULT 0,
    lease INTEGER NOT NULL DEFAULT 0,
    first_queued_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_error TEXT,
    UNIQUE (object_id, lead_id));

CREATE TABLE IF NOT EXISTS event_links (
    event_pk INTEGER NOT NULL,
    link_id INTEGER NOT NULL,
    PRIMARY KEY (event_pk, link_id));

CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    link_id INTEGER NOT NULL,
    at INTEGER NOT NULL,
    status_code INTEGER,
    error TEXT,
    response_excerpt TEXT,
    duration_ms INTEGER NOT NULL);

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
