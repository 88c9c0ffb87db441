-- Fair dispatch: each event carries a start tag (see src/webhooks/fairness.rs) and dispatch claims
-- due events in tag order, so a sender that floods the inbox waits behind its own events.
-- Bounded waits: a migration must never queue behind (or hold up) live traffic indefinitely.
SET LOCAL lock_timeout = '5s';
SET LOCAL statement_timeout = '60s';

-- A constant default: adding the column rewrites nothing. Events stored before it are tagged 0
-- and so go first, in the order the previous claim gave them.
ALTER TABLE orchestrator_webhook_events ADD COLUMN IF NOT EXISTS fair_tag BIGINT NOT NULL DEFAULT 0;
