-- Feedback from the mail provider's webhooks (Amazon SES through SNS, SendGrid's Event Webhook):
-- one row per bounce or complaint, kept once per provider event id so that a webhook delivered
-- twice counts once.
-- - `kind`: `bounce` (a hard bounce: the address does not exist; suppressed), `soft_bounce`
--   (mailbox full, blocked for now: recorded, not suppressed) or `complaint` (suppressed).
-- - `request_id`: the request the message belonged to, when the provider passed it back (SES
--   message tags or headers, a SendGrid custom argument); NULL when it did not.
-- - `address`: the recipient's key, as in `suppressions`.
-- - `logged_at`: when the completion job wrote it to the BigQuery `feedback` table.
CREATE TABLE feedback (
    provider    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('bounce', 'soft_bounce', 'complaint')),
    detail      TEXT,
    request_id  TEXT,
    address     TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    logged_at   TIMESTAMPTZ,
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX feedback_of_request ON feedback (request_id, kind) WHERE request_id IS NOT NULL;
CREATE INDEX feedback_unlogged ON feedback (received_at) WHERE logged_at IS NULL;
