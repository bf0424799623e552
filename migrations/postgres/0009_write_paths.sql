-- sprintlink schema version 9 (write paths): room on each page of `links` for the new version
-- of a row. A claim changes only `locked_until` and `lease`, which no index holds, so with room
-- on the page PostgreSQL writes it as a heap-only update instead of a new entry in each of the
-- table's six indexes. Pages written from now on keep 30 % free; existing ones fill as before.

ALTER TABLE links SET (fillfactor = 70);
