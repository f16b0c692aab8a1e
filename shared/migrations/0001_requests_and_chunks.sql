-- Delivery requests, keyed by the caller's id.
CREATE TABLE requests (
    id                TEXT PRIMARY KEY,
    class             TEXT NOT NULL CHECK (class IN ('realtime', 'batch')),
    priority          INTEGER NOT NULL DEFAULT 0,
    state             TEXT NOT NULL CHECK (state IN ('received', 'preparing', 'dispatching', 'completed',
                                                     'failed', 'expired', 'cancelled', 'rejected')),
    -- The request as received (template, audience, labels); NULL for a rejected one that could not be read.
    body              JSONB,
    labels            JSONB NOT NULL DEFAULT '{}',
    not_before        TIMESTAMPTZ,
    deadline          TIMESTAMPTZ,
    reason            TEXT,
    lease_until       TIMESTAMPTZ,
    -- Filled by the prepare step.
    audience_rows     BIGINT,
    recipients        BIGINT,
    skipped           JSONB NOT NULL DEFAULT '{}',
    chunk_count       INTEGER,
    -- Chunks handed to the upload queue so far, and when the last one was: requests of equal rank
    -- take turns by the latter (round-robin).
    dispatched_chunks INTEGER NOT NULL DEFAULT 0,
    last_dispatched_at TIMESTAMPTZ,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    prepared_at       TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    logged_at         TIMESTAMPTZ
);

CREATE INDEX requests_open ON requests (state) WHERE state NOT IN ('completed', 'failed', 'expired', 'cancelled', 'rejected');

-- A slice of one request's audience: the unit of upload, send, retry and scheduling.
CREATE TABLE chunks (
    id            TEXT PRIMARY KEY,
    request_id    TEXT NOT NULL REFERENCES requests (id),
    seq           INTEGER NOT NULL,
    -- Copied from the request so that the scheduler reads one table.
    class         TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    deadline      TIMESTAMPTZ,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'queued', 'uploading', 'uploaded', 'sending', 'sent',
                                                 'completed', 'failed', 'expired', 'cancelled', 'unknown')),
    object        TEXT NOT NULL,
    recipients    INTEGER NOT NULL,
    -- Incremented on every hand-off to the upload queue: part of the task name.
    generation    INTEGER NOT NULL DEFAULT 0,
    upload_attempts INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    lease_until   TIMESTAMPTZ,
    list_id       TEXT,
    delivery_id   TEXT,
    delivered     BIGINT,
    bounced       BIGINT,
    failed        BIGINT,
    reason        TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    queued_at     TIMESTAMPTZ,
    uploaded_at   TIMESTAMPTZ,
    sent_at       TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ,
    logged_at     TIMESTAMPTZ,
    UNIQUE (request_id, seq)
);

CREATE INDEX chunks_pending ON chunks ((class = 'realtime') DESC, priority DESC, deadline ASC NULLS LAST)
    WHERE state = 'pending';
CREATE INDEX chunks_in_flight ON chunks (state) WHERE state IN ('queued', 'uploading', 'uploaded', 'sending', 'sent');
CREATE INDEX chunks_request ON chunks (request_id, state);

-- One row per ESP API whose slots the scheduler hands out; locked by each dispatch so that
-- several trigger instances never over-commit a slot.
CREATE TABLE dispatch_slots (
    api TEXT PRIMARY KEY
);
INSERT INTO dispatch_slots (api) VALUES ('upload');

-- Messages that could never become a request (no usable id), kept so that their senders can be told why.
CREATE TABLE rejected_messages (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT,
    reason      TEXT NOT NULL,
    excerpt     TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
