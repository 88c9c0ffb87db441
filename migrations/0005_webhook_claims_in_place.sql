-- A dispatch claim now only takes a lease (lease_owner, lease_until, attempts) and leaves status
-- alone; "processing" is shown for a pending event with a live lease. No indexed column changes,
-- so with free room on the page the claim is a HOT update: one new heap tuple, no index entries.
-- Rows an older release claimed still say 'processing' and are treated the same way.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- An older release claims by setting status = 'processing' and takes any 'pending' row, even one
-- whose lease is live: during a rolling upgrade it would run an event a second time. From here on
-- no row may become 'processing', so an older replica's claims fail (it dispatches nothing) until
-- it is replaced. NOT VALID: rows claimed before the upgrade keep 'processing' until their outcome.
-- (Rolling back to an older release after this migration stops its dispatch the same way.)
ALTER TABLE webhook_events
    ADD CONSTRAINT webhook_events_claims_keep_status CHECK (status <> 'processing') NOT VALID;

-- Room for the claimed version of a row next to it. Applies to pages written from now on.
ALTER TABLE webhook_events SET (fillfactor = 70);

-- Bodies are compressed inline; lz4 costs a fraction of pglz's CPU on every insert and read.
-- A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE webhook_events ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available on this server; webhook bodies keep pglz';
END
$$;
