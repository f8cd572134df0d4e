-- One status rule, stated once: which of two statuses of a message wins.
--
-- The stored status is the greatest, by smsflow_status_precedence, of the statuses the message
-- has had: its send-path statuses and every distinct callback. A maximum does not depend on the
-- order, the duplicates, the batches or the number of workers that brought the events, so the
-- same callbacks always end in the same row. The worker picks each batch's winner with this
-- function and the upsert compares against the stored row with it; nothing else ranks statuses.

-- The forward-only order. Terminal statuses share the top rank; between two of them the
-- precedence's later fields decide.
CREATE FUNCTION smsflow_status_rank(status text) RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN CASE status
        WHEN 'accepted' THEN 10
        WHEN 'sending' THEN 20
        -- A send whose outcome cannot be known: any callback Plivo later sends for it still lands.
        WHEN 'unknown' THEN 25
        WHEN 'submitted' THEN 30
        WHEN 'queued' THEN 40
        WHEN 'sent' THEN 50
        WHEN 'delivered' THEN 100
        WHEN 'undelivered' THEN 100
        WHEN 'failed' THEN 100
        WHEN 'rejected' THEN 100
    END;

CREATE FUNCTION smsflow_status_is_terminal(status text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN smsflow_status_rank(status) = 100;

-- Rank first (forward only); then Plivo's Sequence, the order in which Plivo generated the
-- callbacks, so that of two terminal statuses Plivo's later word wins; then Plivo's own time of
-- the event; then the callback's dedupe key, so that even two callbacks equal in all of that
-- (a replay with another error code, say) have one winner whatever the order they came in.
-- Every field comes from the callback's own parameters, never from when it was received: a
-- retry of the same callback is the same event.
CREATE TYPE smsflow_status_precedence AS (
    rank      smallint,
    sequence  bigint,
    event_at  timestamptz,
    event_key bytea
);

CREATE FUNCTION smsflow_status_precedence(status text, sequence bigint, event_at timestamptz, event_key bytea)
    RETURNS smsflow_status_precedence
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ROW(smsflow_status_rank(status), COALESCE(sequence, -1), COALESCE(event_at, '-infinity'::timestamptz),
               COALESCE(event_key, '\x'::bytea))::smsflow_status_precedence;

ALTER TABLE messages DROP COLUMN status_rank;  -- and with it the CHECK on literal ranks
ALTER TABLE messages
    -- Plivo's time and the dedupe key of the callback that set the status (NULL for a status
    -- the send path set).
    ADD COLUMN status_event_at  timestamptz,
    ADD COLUMN status_event_key bytea,
    ADD COLUMN status_rank smallint GENERATED ALWAYS AS (smsflow_status_rank(status)) STORED,
    ADD COLUMN status_precedence smsflow_status_precedence GENERATED ALWAYS AS
        (smsflow_status_precedence(status, status_sequence, status_event_at, status_event_key)) STORED,
    -- SHA-256 of a send job's content (recipient, sender, text, options): the same id with
    -- another content is refused instead of sending one body under the other's id. NULL for
    -- rows created by callbacks and for jobs recorded before this column existed.
    ADD COLUMN job_fingerprint bytea,
    ADD CONSTRAINT messages_job_fingerprint_sha256 CHECK (job_fingerprint IS NULL OR octet_length(job_fingerprint) = 32);

-- Consent changes apply in the order the recipient made them, not the order we processed them:
-- the time of the message that opted out (a START older than it does not lift it).
ALTER TABLE opt_outs ADD COLUMN opted_out_at timestamptz;
UPDATE opt_outs SET opted_out_at = created_at;
ALTER TABLE opt_outs ALTER COLUMN opted_out_at SET NOT NULL, ALTER COLUMN opted_out_at SET DEFAULT now();

-- Short codes were stored with a '+' by inbound STOP handling ('+12345'); senders are stored as
-- the send path writes them: E.164 for long numbers, digits for short codes (3–8 digits).
UPDATE opt_outs o SET sender = substr(o.sender, 2)
WHERE o.sender ~ '^\+[0-9]{3,8}$'
  AND NOT EXISTS (SELECT 1 FROM opt_outs d WHERE d.recipient = o.recipient AND d.sender = substr(o.sender, 2));
DELETE FROM opt_outs WHERE sender ~ '^\+[0-9]{3,8}$';

-- Status callbacks stored Plivo's digits ('14155559292'); numbers are E.164 everywhere else.
UPDATE messages SET recipient = '+' || recipient WHERE recipient ~ '^[0-9]{3,15}$';
UPDATE messages SET sender = '+' || sender WHERE sender ~ '^[0-9]{9,15}$';
UPDATE inbound_messages SET recipient = substr(recipient, 2) WHERE recipient ~ '^\+[0-9]{3,8}$';
