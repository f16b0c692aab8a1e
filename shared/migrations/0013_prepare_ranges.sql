-- Large audience files are read in byte ranges, each range its own shard, and the partitions are
-- cut in groups of shards, so that the first chunks of a large audience are stored while the
-- rest of it is still being spread (see the trigger's `prepare::parts`):
--
-- - a shard reads the bytes `[start_byte, end_byte)` of its file (all of it when NULL), whose
--   first line is line `first_line` of the file, and that holds about `bytes` bytes of rows;
-- - a `partition` part is now a cut: group `index >> 16` of shards (groups doubling in bytes),
--   and of the partitions, those whose number is `index & 0xffff` modulo `stride`.
ALTER TABLE prepare_parts
    ADD COLUMN start_byte bigint,
    ADD COLUMN end_byte   bigint,
    ADD COLUMN first_line bigint,
    ADD COLUMN bytes      bigint,
    ADD COLUMN stride     integer;
