-- sprintlink schema version 5: one notification per alert kind, target and interval for a
-- whole fleet. The replica whose INSERT of a (target, kind, window_start) row succeeds sends
-- that notification; the others stand down. Rows older than a day are deleted as new ones come.

CREATE TABLE IF NOT EXISTS alert_slots (
    target BIGINT NOT NULL,
    kind TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    claimed_at BIGINT NOT NULL,
    PRIMARY KEY (target, kind, window_start));
