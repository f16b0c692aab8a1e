-- The provider's real limit can be lower than the configured one (an ESP shared with another
-- system, or a limit the provider lowered). The slot row then also carries the limit the trigger
-- grants slots against, and the refusals it has not yet taken into account:
-- - `effective_limit`: slots granted, between 1 and the configured limit; NULL means the
--   configured limit. Lowered when the provider refuses a call for its limit below it, raised by
--   one after a quiet interval.
-- - `limit_changed_at`: when `effective_limit` last changed, where the quiet interval counts from.
-- - `refused_in_flight`: set when the provider refused a call for its limit (429), to the fewest
--   other calls that were in progress at one of the refusals since the last dispatch round; the
--   next round takes it into account and clears it.
ALTER TABLE dispatch_slots ADD COLUMN effective_limit INTEGER CHECK (effective_limit >= 1);
ALTER TABLE dispatch_slots ADD COLUMN limit_changed_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE dispatch_slots ADD COLUMN refused_in_flight INTEGER CHECK (refused_in_flight >= 0);
