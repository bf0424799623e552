-- sprintlink schema version 9 (write paths): the search indexes on a lead id and on an object id
-- (`links_lead` and `events_object` of version 7) are kept off the ingest path. Both values are
-- random with respect to arrival, so indexing them in the group commit wrote about one more page
-- of the log per event and per index. `lead_links` and `event_objects` hold the same pairs,
-- filled in batches by the writer's background lane (`store::sqlite::search_index`) for every
-- row above the mark of its table in `index_marks`; a search reads them plus the few rows above
-- the mark. Link and event ids only grow (AUTOINCREMENT) and are never reused, so a mark is
-- exact; the triggers keep the entries of rows below it in step with what changes later.

CREATE TABLE IF NOT EXISTS index_marks (
    name TEXT PRIMARY KEY,
    upto INTEGER NOT NULL) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS lead_links (
    lead_id TEXT NOT NULL,
    link_id INTEGER NOT NULL,
    PRIMARY KEY (lead_id, link_id)) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS event_objects (
    object_id TEXT NOT NULL,
    event_pk INTEGER NOT NULL,
    PRIMARY KEY (object_id, event_pk)) WITHOUT ROWID;

INSERT OR IGNORE INTO lead_links (lead_id, link_id) SELECT lead_id, id FROM links;

INSERT OR IGNORE INTO event_objects (object_id, event_pk)
    SELECT object_id, id FROM events WHERE object_id IS NOT NULL;

INSERT OR REPLACE INTO index_marks (name, upto) VALUES
    ('lead_links', COALESCE((SELECT MAX(id) FROM links), 0)),
    ('event_objects', COALESCE((SELECT MAX(id) FROM events), 0));

-- A link or an event that goes (an orphan dropped, a replay, retention) takes its entry with it.
CREATE TRIGGER IF NOT EXISTS links_lead_gone AFTER DELETE ON links BEGIN
    DELETE FROM lead_links WHERE lead_id = OLD.lead_id AND link_id = OLD.id;
END;

CREATE TRIGGER IF NOT EXISTS events_object_gone AFTER DELETE ON events
WHEN OLD.object_id IS NOT NULL
BEGIN
    DELETE FROM event_objects WHERE object_id = OLD.object_id AND event_pk = OLD.id;
END;

-- An event below the mark whose object id is set later (an object created, a replay) moves its
-- entry; one above the mark is indexed with its object id of the time.
CREATE TRIGGER IF NOT EXISTS events_object_moved AFTER UPDATE OF object_id ON events
WHEN OLD.object_id IS NOT NEW.object_id
    AND NEW.id <= (SELECT upto FROM index_marks WHERE name = 'event_objects')
BEGIN
    DELETE FROM event_objects WHERE object_id = OLD.object_id AND event_pk = OLD.id;
    INSERT OR IGNORE INTO event_objects (object_id, event_pk)
        SELECT NEW.object_id, NEW.id WHERE NEW.object_id IS NOT NULL;
END;

DROP INDEX IF EXISTS links_lead;

DROP INDEX IF EXISTS events_object;
