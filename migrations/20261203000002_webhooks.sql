-- Signed webhooks: a send job's `callback` URL receives each status change of its message.
--
-- The URL is kept on the message; each status event in the outbox carries it, so the relay,
-- which publishes the event, also hands a delivery job to the worker's webhook stream in the
-- same round, and deletes the row only when both are confirmed. Every attempt to deliver is
-- recorded, for `GET /v1/messages/{id}`.
--
-- Status events are now written set-based: one statement-level trigger per statement on
-- `messages` (transition tables) inserts all of the statement's events in one INSERT … SELECT
-- and notifies the relay once, where row triggers ran a PL/pgSQL call, an INSERT and a NOTIFY
-- per changed row. What is written is the same: the rules (no event for `sending`, `sending`
-- back to `accepted` is no change, previous_status names the last status that had an event)
-- and the data. PostgreSQL allows no column list with transition tables, so the UPDATE trigger
-- runs for every UPDATE of `messages` (finding nothing to write when no status changed): a
-- large operator backfill of another column builds both transition tables; run it in chunks.

ALTER TABLE messages ADD COLUMN callback_url text;

-- Where the event must also be delivered as a webhook (NULL: nowhere).
ALTER TABLE event_outbox ADD COLUMN webhook_url text;

CREATE TABLE webhook_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id   uuid NOT NULL,
    -- The event delivered: also the `webhook-id` the receiver deduplicates on.
    event_id     uuid NOT NULL,
    event_type   text NOT NULL,
    -- 1 for the first try, then one more per rung of the retry ladder.
    attempt      integer NOT NULL,
    -- Scheme, host and port: never the path or query, which may hold the receiver's secret.
    endpoint     text NOT NULL,
    -- delivered, rejected (an HTTP status other than 2xx), unreachable (no answer within the
    -- timeout, connection refused, TLS), refused_address (private address not allowed).
    outcome      text NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  integer NOT NULL,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT webhook_attempts_outcome_known CHECK (outcome IN
        ('delivered', 'rejected', 'unreachable', 'refused_address'))
);

CREATE INDEX webhook_attempts_by_message ON webhook_attempts (message_id, id);


-- A message's status event data; `previous` is NULL for a message's first event.
CREATE FUNCTION smsflow_message_status_data(m messages, previous text) RETURNS jsonb
    LANGUAGE sql STABLE
    RETURN jsonb_build_object(
        'message_id', m.id,
        'message_uuid', m.message_uuid,
        'status', m.status,
        'previous_status', CASE previous WHEN 'sending' THEN 'accepted' ELSE previous END,
        'status_reason', m.status_reason,
        'error_code', m.error_code,
        'sender', m.sender,
        'recipient', m.recipient,
        'units', m.units,
        'amount', m.amount::text,
        'metadata', m.metadata,
        -- Plivo's own time of the status, when its callback gave one.
        'status_at', m.status_event_at,
        'accepted_at', m.accepted_at,
        'submitted_at', m.submitted_at,
        'terminal_at', m.terminal_at
    );

CREATE FUNCTION smsflow_message_status_events() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO event_outbox (routing_key, subject, data, traceparent, occurred_at, webhook_url)
        SELECT 'message.status.' || n.status, n.id::text, smsflow_message_status_data(n, NULL),
               smsflow_event_traceparent(), COALESCE(n.status_event_at, n.terminal_at, now()), n.callback_url
        FROM new_rows n
        WHERE n.status <> 'sending'
        ORDER BY n.id;
    ELSE
        INSERT INTO event_outbox (routing_key, subject, data, traceparent, occurred_at, webhook_url)
        SELECT 'message.status.' || n.status, n.id::text, smsflow_message_status_data(n, o.status),
               smsflow_event_traceparent(), COALESCE(n.status_event_at, n.terminal_at, now()), n.callback_url
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status IS DISTINCT FROM n.status
          AND n.status <> 'sending'
          AND NOT (o.status = 'sending' AND n.status = 'accepted')
        ORDER BY n.id;
    END IF;
    IF FOUND THEN
        PERFORM pg_notify('smsflow_event_outbox', '');
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER messages_status_created ON messages;
DROP TRIGGER messages_status_changed ON messages;
DROP FUNCTION smsflow_message_status_event();

CREATE TRIGGER messages_status_created AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION smsflow_message_status_events();

CREATE TRIGGER messages_status_changed AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION smsflow_message_status_events();
