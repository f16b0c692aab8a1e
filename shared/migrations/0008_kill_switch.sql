-- The completion job's kill switch pauses a request whose bounce rate crosses the configured
-- threshold. `resumed_at` is when an operator last resumed a paused request: the kill switch
-- counts only chunks finished after it, so a resumed request is judged on a fresh sample.
ALTER TABLE requests ADD COLUMN resumed_at TIMESTAMPTZ;
