-- sprintlink schema version 3: the request as received (SPEC 6.4).
-- raw_body holds the body byte for byte (forms, multipart, bytes that are not UTF-8); rows
-- written before keep it NULL and their `body` text is the JSON they received. New rows leave
-- `body` empty. content_type is the request's Content-Type (NULL: none, read as JSON);
-- request_headers and request_query are JSON objects of the headers and query parameters a
-- `header:` or `query:` reference of the source names (NULL: none).

ALTER TABLE events ADD COLUMN raw_body BLOB;

ALTER TABLE events ADD COLUMN content_type TEXT;

ALTER TABLE events ADD COLUMN request_headers TEXT;

ALTER TABLE events ADD COLUMN request_query TEXT;
