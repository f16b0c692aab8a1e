-- The delivery message a small realtime chunk sent without a list was handed over in, named by
-- its first chunk: the trigger counts the messages in flight against the ESP's send slots.
ALTER TABLE chunks ADD COLUMN send_group TEXT;
