-- A large audience is prepared in parts, each by its own prepare task, so that several trigger
-- instances share the work and no instance holds more than one part's recipients:
--
-- - a `shard` part reads one audience file (or BigQuery export shard), checks its rows, and
--   spreads the valid ones over the request's partitions by a hash of the address;
-- - a `partition` part, once every shard is done, de-duplicates one partition exactly (the same
--   address always lands in the same partition) and cuts it into chunks, numbered from
--   `first_seq`, which leaves room for every row written to the partition.
--
-- The request's summary is the sum of its parts'. A part is done once; a part whose lease ran
-- out (its worker died) is taken over and done again, writing the same objects and chunks.
CREATE TABLE prepare_parts (
    request_id     text        NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    kind           text        NOT NULL CHECK (kind IN ('shard', 'partition')),
    index          integer     NOT NULL CHECK (index >= 0),
    -- A shard's file: its object, in the bucket named, and its format.
    bucket         text,
    object         text,
    format         text,
    -- A partition's first chunk number.
    first_seq      integer,
    done           boolean     NOT NULL DEFAULT false,
    lease_until    timestamptz,
    -- What the part found: rows read (shards), recipients kept and chunks written (partitions),
    -- rows skipped by reason and where the first few are.
    rows           bigint      NOT NULL DEFAULT 0,
    recipients     bigint      NOT NULL DEFAULT 0,
    chunks         integer     NOT NULL DEFAULT 0,
    skipped        jsonb       NOT NULL DEFAULT '{}',
    skipped_at     jsonb       NOT NULL DEFAULT '{}',
    -- A shard's valid rows written to each partition, by partition.
    partition_rows bigint[]    NOT NULL DEFAULT '{}',
    PRIMARY KEY (request_id, kind, index)
);

-- How many partitions the request's audience is spread over; set once its shard tasks exist.
ALTER TABLE requests ADD COLUMN partitions integer;
