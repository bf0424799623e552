-- sprintlink schema version 8: the trace context of the webhook that stored the event (SPEC 10,
-- tracing), as a W3C `traceparent` value naming the webhook's span. The worker's SprintHub
-- calls for the event are its children; a replay keeps it. NULL: stored without tracing (or
-- before this version); the worker then starts a new trace for the event's calls.

ALTER TABLE events ADD COLUMN trace_context TEXT;
