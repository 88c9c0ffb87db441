-- Pending events, waiting or being dispatched (a live lease), from the partial index of pending
-- rows only.
SELECT CASE WHEN lease_until > now() THEN 'processing' ELSE 'pending' END AS "status!", count(*) AS "count!"
FROM orchestrator_webhook_events WHERE status = 'pending' GROUP BY 1
