-- Fair dispatch: each event carries a start tag (see src/webhooks/fairness.rs) and dispatch claims
-- due events in tag order, so a sender that floods the inbox waits behind its own events.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- A constant default: adding the column rewrites nothing. Events stored before it are tagged 0
-- and so go first, in the order the previous claim gave them.
ALTER TABLE orchestrator_webhook_events ADD COLUMN IF NOT EXISTS fair_tag BIGINT NOT NULL DEFAULT 0;

-- What a claim walks: pending events in tag order. next_attempt_at is the second key so that a
-- retry not yet due is passed over inside the index, without reading its row. The due index stays
-- for finding when the next event falls due (`next_claimable`).
CREATE INDEX IF NOT EXISTS orchestrator_webhook_events_fair_idx
    ON orchestrator_webhook_events (fair_tag, next_attempt_at)
    WHERE status = 'pending';
