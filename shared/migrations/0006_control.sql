-- Pausing and cancelling a request (`POST /v1/requests/{id}:pause`, `:resume`, `:cancel`).
-- - `paused_at`: while set, none of the request's chunks is dispatched; chunks already handed on
--   finish, and pending chunks still expire at the deadline. `pause_reason` says who or what
--   paused it.
-- - `cancel_requested_at`: set once, never cleared. Chunks not yet handed to the send step end
--   `cancelled`, and the completion job closes the request `cancelled` once every chunk is final.
ALTER TABLE requests ADD COLUMN paused_at TIMESTAMPTZ;
ALTER TABLE requests ADD COLUMN pause_reason TEXT;
ALTER TABLE requests ADD COLUMN cancel_requested_at TIMESTAMPTZ;

-- `GET /v1/requests` lists newest first, filtered by state, class and labels.
CREATE INDEX requests_received ON requests (received_at DESC, id DESC);
CREATE INDEX requests_labels ON requests USING gin (labels jsonb_path_ops);
-- The completion job's sweep of cancelled requests still open.
CREATE INDEX requests_cancelling ON requests (id)
    WHERE cancel_requested_at IS NOT NULL AND state IN ('received', 'preparing', 'dispatching');
