-- Signed webhooks: a send job's `callback` URL receives each status change of its message.
--
-- The URL is kept on the message; each status event in the outbox carries it, so the relay,
-- which publishes the event, also hands a delivery job to the worker's webhook stream in the
-- same round, and deletes the row only when both are confirmed. Every attempt to deliver is
-- recorded, for `GET /v1/messages/{id}`.

ALTER TABLE messages ADD COLUMN callback_url text;

-- Where the event must also be delivered as a webhook (NULL: nowhere).
ALTER TABLE event_outbox ADD COLUMN webhook_url text;

-- Filled here rather than by each event's writer: a status event is written by a trigger on
-- `messages`, and the message's row is the one place the URL lives.
CREATE FUNCTION smsflow_event_webhook_url() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    -- A subject that is not a message id (an operator's own event) has no URL, and no error.
    IF NEW.routing_key LIKE 'message.status.%'
       AND NEW.subject ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
        SELECT callback_url INTO NEW.webhook_url FROM messages WHERE id = NEW.subject::uuid;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER event_outbox_webhook_url BEFORE INSERT ON event_outbox
    FOR EACH ROW EXECUTE FUNCTION smsflow_event_webhook_url();

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
