-- sprintlink schema version 2: retention (SPEC section 9).
-- `delivered_at`: when the event's last link became linked (what `retention.delivered` and
-- `retention.bodies` count from), set by the trigger below on every path that delivers an event.
-- `body_removed_at`: when retention blanked the body, so an empty body sent by the sender is told
-- apart from one removed here.

ALTER TABLE events ADD COLUMN IF NOT EXISTS delivered_at BIGINT;

ALTER TABLE events ADD COLUMN IF NOT EXISTS body_removed_at BIGINT;

-- Events delivered before this version: the time of the last attempt of their links, or, for an
-- event delivered without a call (every pair already linked), the time it was received.
UPDATE events SET delivered_at = COALESCE(
    (SELECT MAX(a.at) FROM event_links el JOIN attempts a ON a.link_id = el.link_id
     WHERE el.event_pk = events.id),
    received_at)
WHERE state = 'delivered';

CREATE OR REPLACE FUNCTION sprintlink_delivered_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'delivered' AND (TG_OP = 'INSERT' OR OLD.state <> 'delivered') THEN
        NEW.delivered_at := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS events_delivered_at ON events;

CREATE TRIGGER events_delivered_at BEFORE INSERT OR UPDATE OF state ON events
    FOR EACH ROW EXECUTE FUNCTION sprintlink_delivered_at();

-- What each retention rule walks, oldest first; each index holds only the rows its rule may touch.
CREATE INDEX IF NOT EXISTS events_delivered_at ON events (delivered_at)
    WHERE delivered_at IS NOT NULL;

CREATE INDEX IF NOT EXISTS events_body_kept ON events (delivered_at)
    WHERE delivered_at IS NOT NULL AND body_removed_at IS NULL;

CREATE INDEX IF NOT EXISTS events_failed ON events (received_at)
    WHERE state IN ('dead', 'parked');
