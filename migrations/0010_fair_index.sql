-- no-transaction
-- What a claim walks (0009): pending events in tag order. next_attempt_at is the second key so
-- that a retry not yet due is passed over inside the index, without reading its row. The due index
-- stays for finding when the next event falls due (`next_claimable`). Built CONCURRENTLY: the inbox
-- takes every delivery, and a plain build would hold its inserts for as long as it reads the table.
-- Alone in its file and outside a transaction, as CONCURRENTLY must be. If a build fails it leaves
-- an invalid index behind: drop it (DROP INDEX CONCURRENTLY orchestrator_webhook_events_fair_idx)
-- before starting again. The migrator sets lock_timeout (5 s) on the connection around a file
-- without a transaction (a SET here would make the file one implicit transaction); the build
-- itself blocks no writes, so it has no statement timeout.
-- squawk-ignore require-lock-timeout, require-statement-timeout
CREATE INDEX CONCURRENTLY IF NOT EXISTS orchestrator_webhook_events_fair_idx
    ON orchestrator_webhook_events (fair_tag, next_attempt_at)
    WHERE status = 'pending';
