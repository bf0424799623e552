-- sprintlink schema version 2: retention (SPEC section 9).
-- `delivered_at`: when the event's last link became linked (what `retention.delivered` and
-- `retention.bodies` count from), set by the triggers below on every path that delivers an event.
-- `body_removed_at`: when retention blanked the body, so an empty body sent by the sender is told
-- apart from one removed here.

ALTER TABLE events ADD COLUMN delivered_at INTEGER;

ALTER TABLE events ADD COLUMN body_removed_at INTEGER;

-- Events delivered before this version: the time of the last attempt of their links, or, for an
-- event delivered without a call (every pair already linked), the time it was received.
UPDATE events SET delivered_at = COALESCE(
    (SELECT MAX(a.at) FROM event_links el JOIN attempts a ON a.link_id = el.link_id
     WHERE el.event_pk = events.id),
    received_at)
WHERE state = 'delivered';

CREATE TRIGGER IF NOT EXISTS events_delivered_at_on_update AFTER UPDATE OF state ON events
WHEN NEW.state = 'delivered' AND OLD.state <> 'delivered'
BEGIN
    UPDATE events SET delivered_at = CAST(unixepoch('subsec') * 1000 AS INTEGER) WHERE id = NEW.id;
END;

CREATE TRIGGER IF NOT EXISTS events_delivered_at_on_insert AFTER INSERT ON events
WHEN NEW.state = 'delivered'
BEGIN
    UPDATE events SET delivered_at = CAST(unixepoch('subsec') * 1000 AS INTEGER) WHERE id = NEW.id;
END;

-- What each retention rule walks, oldest first; each index holds only the rows its rule may touch.
CREATE INDEX IF NOT EXISTS events_delivered_at ON events (delivered_at)
    WHERE delivered_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS events_body_kept ON events (delivered_at)
    WHERE delivered_at IS NOT NULL AND body_removed_at IS NULL;

CREATE INDEX IF NOT EXISTS events_failed ON events (received_at)
    WHERE state IN ('dead', 'parked');
