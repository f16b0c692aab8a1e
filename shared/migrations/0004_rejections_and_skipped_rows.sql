-- Rejections are listed newest first (GET /v1/rejections), with the id a message claimed even
-- when it was not a usable one.
ALTER TABLE rejected_messages ADD COLUMN claimed_id TEXT;
CREATE INDEX rejected_messages_received ON rejected_messages (received_at DESC, id DESC);
CREATE INDEX requests_rejected ON requests (finished_at DESC, id DESC) WHERE state = 'rejected';

-- Where the first few rows skipped for each reason are (`SOURCE:LINE`), beside the counts.
ALTER TABLE requests ADD COLUMN skipped_at JSONB NOT NULL DEFAULT '{}';
