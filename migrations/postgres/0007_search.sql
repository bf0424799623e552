-- sprintlink schema version 7: indexes for the admin search (GET /admin/events filters) and for
-- sprintlink_oldest_pending_seconds. The event id prefix (`q`) is a range in byte order
-- (COLLATE "C"), whatever the database's collation, so it gets an index of its own.

CREATE INDEX IF NOT EXISTS events_object ON events (object_id, id) WHERE object_id IS NOT NULL;

CREATE INDEX IF NOT EXISTS events_received ON events (received_at, id);

CREATE INDEX IF NOT EXISTS events_event_id_c ON events ((event_id COLLATE "C"));

CREATE INDEX IF NOT EXISTS links_lead ON links (lead_id);

CREATE INDEX IF NOT EXISTS mappings_key ON mappings (key);

CREATE INDEX IF NOT EXISTS links_pending_first ON links (first_queued_at) WHERE due_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS events_resolve_first ON events (resolve_first) WHERE resolve_due IS NOT NULL;

CREATE INDEX IF NOT EXISTS objects_pending_first ON objects (first_at) WHERE due_at IS NOT NULL;

-- Retention's `failed` rule also removes discarded events (SPEC 9): the partial index of
-- version 2 lists dead and parked ones only.
CREATE INDEX IF NOT EXISTS events_closed ON events (received_at)
    WHERE state IN ('dead', 'parked', 'discarded');
