-- The trace a delivery request belongs to: the W3C `traceparent` of the span that took it in.
-- Work done for the request later, whatever event started it (a dispatch round woken by another
-- request's chunk, a completion pass), joins this trace, so that one request is one trace.
ALTER TABLE requests ADD COLUMN traceparent text;
