-- Status events out: a transactional outbox.
--
-- Every committed change that services may subscribe to (a message's status, an inbound SMS,
-- an opt-out added or removed) writes one row here in the same transaction, from triggers on
-- the tables themselves: whichever statement makes the change (the worker's batches, its send
-- path, an operator's SQL), the event cannot be forgotten, and a change that rolls back leaves
-- no event. The worker's relay publishes the rows in id order to the `{prefix}.events` topic
-- exchange, with publisher confirms, and deletes what the broker confirmed.
--
-- Order: a status change holds its message's row lock until commit, so a later change of the
-- same message takes its id after the earlier one's commit: per message, ids follow the order
-- in which changes committed.

CREATE TABLE event_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stable across redeliveries: consumers deduplicate on it.
    event_id    uuid NOT NULL DEFAULT gen_random_uuid(),
    -- The AMQP routing key, which is also the event's type: message.status.delivered, ...
    routing_key text NOT NULL,
    -- What the event is about (a message's id, an inbound SMS's MessageUUID, a number): the
    -- relay keeps each subject's events in order.
    subject     text NOT NULL,
    data        jsonb NOT NULL,
    -- The trace of the work that made the change (set per transaction by the worker).
    traceparent text,
    occurred_at timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The setting a writer puts its trace context in, for the events its transaction makes.
CREATE FUNCTION smsflow_event_traceparent() RETURNS text
    LANGUAGE sql STABLE
    RETURN NULLIF(current_setting('smsflow.traceparent', true), '');

CREATE FUNCTION smsflow_emit_event(event_type text, event_subject text, event_data jsonb, event_at timestamptz)
    RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO event_outbox (routing_key, subject, data, traceparent, occurred_at)
    VALUES (event_type, event_subject, event_data, smsflow_event_traceparent(), event_at);
    -- One notification per transaction: PostgreSQL folds identical ones.
    PERFORM pg_notify('smsflow_event_outbox', '');
END $$;

-- A message's status. `sending` is the worker's own state while it calls Plivo (it returns
-- to `accepted` when a call provably made nothing): it has no event, and an event's
-- previous_status names the last status that had one.
CREATE FUNCTION smsflow_message_status_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM smsflow_emit_event(
        'message.status.' || NEW.status,
        NEW.id::text,
        jsonb_build_object(
            'message_id', NEW.id,
            'message_uuid', NEW.message_uuid,
            'status', NEW.status,
            'previous_status', CASE WHEN TG_OP = 'UPDATE' THEN
                CASE OLD.status WHEN 'sending' THEN 'accepted' ELSE OLD.status END END,
            'status_reason', NEW.status_reason,
            'error_code', NEW.error_code,
            'sender', NEW.sender,
            'recipient', NEW.recipient,
            'units', NEW.units,
            'amount', NEW.amount::text,
            'metadata', NEW.metadata,
            -- Plivo's own time of the status, when its callback gave one.
            'status_at', NEW.status_event_at,
            'accepted_at', NEW.accepted_at,
            'submitted_at', NEW.submitted_at,
            'terminal_at', NEW.terminal_at
        ),
        COALESCE(NEW.status_event_at, NEW.terminal_at, now())
    );
    RETURN NULL;
END $$;

CREATE TRIGGER messages_status_created AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.status <> 'sending')
    EXECUTE FUNCTION smsflow_message_status_event();

CREATE TRIGGER messages_status_changed AFTER UPDATE OF status ON messages
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
                       AND NEW.status <> 'sending'
                       AND NOT (OLD.status = 'sending' AND NEW.status = 'accepted'))
    EXECUTE FUNCTION smsflow_message_status_event();

CREATE FUNCTION smsflow_inbound_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM smsflow_emit_event(
        'inbound.received',
        NEW.message_uuid,
        jsonb_build_object(
            'message_uuid', NEW.message_uuid,
            'sender', NEW.sender,
            'recipient', NEW.recipient,
            'text', NEW.body,
            'type', NEW.message_type,
            'units', NEW.units,
            'intent', NEW.intent,
            'received_at', NEW.received_at
        ),
        NEW.received_at
    );
    RETURN NULL;
END $$;

CREATE TRIGGER inbound_messages_received AFTER INSERT ON inbound_messages
    FOR EACH ROW EXECUTE FUNCTION smsflow_inbound_event();

-- An opt-out added or lifted. Refreshing an existing one (a second STOP) changes nothing a
-- service acts on: no event.
CREATE FUNCTION smsflow_opt_out_event() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    changed opt_outs;
BEGIN
    IF TG_OP = 'INSERT' THEN changed := NEW; ELSE changed := OLD; END IF;
    PERFORM smsflow_emit_event(
        CASE TG_OP WHEN 'INSERT' THEN 'optout.added' ELSE 'optout.removed' END,
        changed.recipient,
        jsonb_build_object(
            'recipient', changed.recipient,
            'sender', changed.sender,
            'source', changed.source,
            'message_uuid', changed.message_uuid,
            'opted_out_at', changed.opted_out_at
        ),
        CASE TG_OP WHEN 'INSERT' THEN changed.opted_out_at ELSE now() END
    );
    RETURN NULL;
END $$;

CREATE TRIGGER opt_outs_added AFTER INSERT ON opt_outs
    FOR EACH ROW EXECUTE FUNCTION smsflow_opt_out_event();

CREATE TRIGGER opt_outs_removed AFTER DELETE ON opt_outs
    FOR EACH ROW EXECUTE FUNCTION smsflow_opt_out_event();
