-- Requests of equal rank share the provider by recipients, not by chunks: chunks differ in size
-- (the remainder of each partition, the first chunks of a large audience, the tail's pieces), and
-- taking turns by chunk let a request of small chunks fall behind. Start-time fair queuing (see
-- the trigger's `scheduling`): `fair_start` is where the request's last dispatched chunk started
-- on the rank's shared count of recipients, `fair_tag` where it ended; the request with the lowest
-- `fair_tag` goes next.
ALTER TABLE requests ADD COLUMN fair_start bigint, ADD COLUMN fair_tag bigint;
