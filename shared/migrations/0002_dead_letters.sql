-- Messages that Pub/Sub gave up delivering, kept against the request they belong to so that
-- they show in its status instead of vanishing.
CREATE TABLE dead_letters (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    request_id  TEXT,
    chunk_id    TEXT,
    excerpt     TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_request ON dead_letters (request_id);
