-- When the list-uploader began the chunk's latest upload attempt. A chunk dispatched beyond the
-- free slots (prefetched) waits in the upload queue before it starts: the tail's pace is fitted
-- to the upload's own time, from this moment, not from the dispatch.
ALTER TABLE chunks ADD COLUMN upload_started_at timestamptz;
