-- Stores a batch of events ($1..$8, parallel arrays) and their delivery ids in one statement. A
-- delivery id seen before, in the table or earlier in the batch, stores nothing (WITH ORDINALITY
-- keeps the request order, so the first of two wins). An event offered a lease ($9, owners or
-- NULL; $10 seconds) is stored with it, as if claimed at once, unless an earlier event of its
-- conversation is unfinished: stored before, or earlier in this batch.
--
-- Run on the queue pool, whose planner settings keep the conversation probe below on the ordering
-- index. Its commit waits for the WAL flush, unlike the pool's other statements: the delivery is
-- acknowledged after it. `set_config` does it in the one round trip (as in record_outcomes.sql).
WITH input AS (
    SELECT t.*, row_number() OVER (PARTITION BY t.ordering_key ORDER BY t.n) AS nth_of_conversation
    FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[],
                $8::bigint[], $9::uuid[])
        WITH ORDINALITY AS t(id, source, kind, delivery_id, headers, body, ordering_key, fair_tag,
                             offered_owner, n),
        (SELECT set_config('synchronous_commit', 'on', true)) AS flushed),
delivery AS (
    INSERT INTO orchestrator_webhook_deliveries (source, delivery_id, event_id)
    SELECT source, delivery_id, id FROM input ORDER BY n
    ON CONFLICT DO NOTHING RETURNING event_id),
-- Materialized: referenced three times below, inlined it would probe the index three times.
leased AS MATERIALIZED (
    SELECT i.*, CASE WHEN i.ordering_key IS NULL OR (i.nth_of_conversation = 1 AND unfinished.id IS NULL)
        THEN i.offered_owner END AS lease_owner
    FROM input i JOIN delivery d ON d.event_id = i.id
    -- One descent of the ordering index per event, whatever the statistics say. When they say
    -- nothing is pending (taken between bursts), every partial index looks empty and so as cheap
    -- to read whole: a NOT EXISTS became one read of every pending entry, hashed, per statement
    -- (measured under `scripts/bench pipeline`: 22 ms per batch of 12 instead of 2), and a lateral
    -- probe walked the fair index. In the ordering index's order, any other index needs a sort,
    -- which the queue pool forbids.
    LEFT JOIN LATERAL (
        SELECT p.id FROM orchestrator_webhook_events p
        WHERE p.ordering_key = i.ordering_key AND p.status = 'pending'
        ORDER BY p.ordering_key, p.received_at
        LIMIT 1) unfinished ON true),
event AS (
    INSERT INTO orchestrator_webhook_events (id, source, kind, delivery_id, headers, body, ordering_key, fair_tag,
                                             lease_owner, lease_until, attempts)
    SELECT id, source, kind, delivery_id, headers::jsonb, body, ordering_key, fair_tag, lease_owner,
        CASE WHEN lease_owner IS NOT NULL THEN now() + make_interval(secs => $10) END,
        CASE WHEN lease_owner IS NOT NULL THEN 1 ELSE 0 END
    FROM leased ORDER BY n
    RETURNING id, lease_owner, received_at)
SELECT id AS "id!", lease_owner, received_at AS "received_at!" FROM event
