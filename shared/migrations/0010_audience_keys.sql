-- The recipients a request's prepare step has seen, for finding repeated ones exactly and in
-- memory that does not grow with the audience: one row per distinct address key, with the place
-- (`first_row`, the ordinal of the valid row among the audience's rows) where it first appeared.
-- A row is a repeat when its key is here with another place; a prepare step repeated after an
-- interruption finds its own rows here with their own places, and keeps them. The completion job
-- deletes a request's keys once its preparation is over.
CREATE TABLE audience_keys (
    request_id TEXT NOT NULL,
    address    TEXT NOT NULL,
    first_row  BIGINT NOT NULL,
    PRIMARY KEY (request_id, address)
);
