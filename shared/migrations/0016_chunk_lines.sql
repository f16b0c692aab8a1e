-- A chunk of an inline audience (at most 10,000 recipients, already in the request's body)
-- holds its recipients' lines (NDJSON, as a chunk object would) in its row instead of a Cloud
-- Storage object: a realtime event is then stored, read and sent without an object write and read
-- of its own. NULL: the lines are in `object`.
ALTER TABLE chunks ADD COLUMN lines TEXT;
