-- Message-based providers (SMTP, SES) hand a chunk over in batches of rendered messages, one
-- outcome per message. The sender keeps its place in the chunk so that a chunk handed back, or
-- taken over after a crash, never hands a message over twice:
-- - `progress`: messages [0, progress) of the chunk have been tried;
-- - `retry`: the indexes below `progress` that were not handed over (deferred) and are still due;
-- - `in_flight`: the indexes of the call in progress, written before the call and cleared after
--   it. A takeover that finds them set cannot know what became of them: they end `unknown`.
ALTER TABLE chunks ADD COLUMN progress  INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chunks ADD COLUMN retry     INTEGER[] NOT NULL DEFAULT '{}';
ALTER TABLE chunks ADD COLUMN in_flight INTEGER[];
-- Times a batch chunk gave its send slot up to realtime work between two batches (it went back
-- to `pending`, keeping its place): not attempts that failed.
ALTER TABLE chunks ADD COLUMN yields    INTEGER NOT NULL DEFAULT 0;
-- Recipients of the chunk whose message outcome could not be established (a chunk that ends
-- `unknown` as a whole counts all its recipients instead).
ALTER TABLE chunks ADD COLUMN unknown   BIGINT;

-- A provider's rate limits, held across every instance: each call (or message) reserves the
-- next free moment of the schedule `name`, which advances by 1/rate per unit.
CREATE TABLE rate_schedules (
    name    TEXT PRIMARY KEY,
    next_at TIMESTAMPTZ NOT NULL
);
