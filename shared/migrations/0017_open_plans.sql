-- A large audience's plan records its shards as it finds them, and the first shards are spread
-- while it is still reading the rest of the file: the first chunks no longer wait for the whole
-- audience to be read. Until the plan has recorded every shard, its request's `plan_open` is
-- true: the last group of shards may still grow, so it is not cut, and the request is not
-- summed; an interrupted plan is taken up again (the shards found again are the same).
ALTER TABLE requests ADD COLUMN plan_open boolean NOT NULL DEFAULT false;
