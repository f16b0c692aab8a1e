-- Suppressions: addresses not to be sent to (`/v1/suppressions`, one-click unsubscribe).
-- - `address`: the address in the form recipients are de-duplicated in (Unicode case folding,
--   the domain in IDNA ASCII form), and in no other form: the key is all that is kept.
-- - `scope`: `global`, or a label `key:value` that holds for requests whose labels hold it.
CREATE TABLE suppressions (
    address    TEXT NOT NULL,
    scope      TEXT NOT NULL,
    reason     TEXT NOT NULL
        CHECK (reason IN ('unsubscribed', 'bounced', 'complained', 'manual', 'imported')),
    source     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (address, scope)
);
-- `GET /v1/suppressions` lists newest first.
CREATE INDEX suppressions_newest ON suppressions (created_at DESC, address DESC, scope DESC);

-- Recipients of a chunk dropped just before it went to the provider because they were
-- suppressed after the chunk was prepared: a list-based ESP's list omits them, a message-based
-- provider is never handed their messages. Their own outcome in the request's accounting.
ALTER TABLE chunks ADD COLUMN suppressed BIGINT;
