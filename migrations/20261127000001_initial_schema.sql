-- smsflow schema. Migrations are append-only: never edit one that has been applied anywhere.

-- One row per outbound message: created by the worker when it accepts a send job (our UUIDv7
-- id), or by the first callback for a message sent outside smsflow.
CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    -- Plivo's MessageUUID: unknown until Plivo accepted the message.
    message_uuid    text UNIQUE,
    sender          text,
    recipient       text,
    body            text,
    -- Forward-only: a write may only raise status_rank (see worker::storage).
    status          text NOT NULL,
    status_rank     smallint NOT NULL,
    -- Plivo's Sequence of the callback that set the status; breaks ties between callbacks.
    status_sequence bigint,
    -- Why a message ended where it did when no Plivo error code says it (e.g. opted_out).
    status_reason   text,
    error_code      integer,
    encoding        text,
    segments        smallint,
    units           integer,
    amount          numeric(14, 5),
    attempts        integer NOT NULL DEFAULT 0,
    metadata        jsonb NOT NULL DEFAULT '{}'::jsonb,
    accepted_at     timestamptz,
    submitted_at    timestamptz,
    last_event_at   timestamptz,
    terminal_at     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_status_known CHECK (status IN
        ('accepted', 'sending', 'unknown', 'submitted', 'queued', 'sent',
         'delivered', 'undelivered', 'failed', 'rejected')),
    CONSTRAINT messages_rank_known CHECK (status_rank IN (10, 20, 25, 30, 40, 50, 100)),
    CONSTRAINT messages_encoding_known CHECK (encoding IS NULL OR encoding IN ('gsm7', 'ucs2')),
    CONSTRAINT messages_segments_positive CHECK (segments IS NULL OR segments > 0),
    CONSTRAINT messages_attempts_non_negative CHECK (attempts >= 0),
    CONSTRAINT messages_metadata_object CHECK (jsonb_typeof(metadata) = 'object')
);

-- The status API's lookups: newest first with a stable tie-breaker for keyset pagination.
CREATE INDEX messages_created_idx ON messages (created_at DESC, id DESC);
CREATE INDEX messages_status_created_idx ON messages (status, created_at DESC, id DESC);
CREATE INDEX messages_recipient_created_idx ON messages (recipient, created_at DESC, id DESC);
CREATE INDEX messages_metadata_idx ON messages USING gin (metadata jsonb_path_ops);

-- Append-only history: one row per distinct callback. A Plivo retry (new nonce, same fields)
-- or a RabbitMQ redelivery has the same dedupe_key and is stored once.
CREATE TABLE message_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dedupe_key   bytea NOT NULL,
    message_id   uuid NOT NULL REFERENCES messages (id),
    message_uuid text,
    status       text NOT NULL,
    sequence     bigint,
    error_code   integer,
    -- Every parameter Plivo sent, as received (Plivo adds fields over time).
    params       jsonb NOT NULL,
    received_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT message_events_dedupe_key_unique UNIQUE (dedupe_key),
    CONSTRAINT message_events_dedupe_key_sha256 CHECK (octet_length(dedupe_key) = 32),
    CONSTRAINT message_events_params_object CHECK (jsonb_typeof(params) = 'object')
);

CREATE INDEX message_events_message_idx ON message_events (message_id, received_at, id);

-- Inbound SMS (two-way messaging), stored once per Plivo MessageUUID.
CREATE TABLE inbound_messages (
    message_uuid text PRIMARY KEY,
    sender       text NOT NULL,
    recipient    text NOT NULL,
    body         text,
    message_type text NOT NULL DEFAULT 'sms',
    units        integer,
    amount       numeric(14, 5),
    -- Plivo's MessageIntent: optout, optin, help, or empty.
    intent       text,
    params       jsonb NOT NULL,
    received_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbound_messages_params_object CHECK (jsonb_typeof(params) = 'object')
);

CREATE INDEX inbound_messages_received_idx ON inbound_messages (received_at DESC, message_uuid);
CREATE INDEX inbound_messages_sender_received_idx ON inbound_messages (sender, received_at DESC);
CREATE INDEX inbound_messages_recipient_received_idx ON inbound_messages (recipient, received_at DESC);

-- The suppression list: `recipient` opted out of messages from `sender` ('*': from all of our
-- numbers, e.g. STOPALL). Sends to a suppressed recipient end as rejected/opted_out.
CREATE TABLE opt_outs (
    recipient  text NOT NULL,
    sender     text NOT NULL,
    source     text NOT NULL,
    -- The inbound message that caused it, when one did.
    message_uuid text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (recipient, sender),
    CONSTRAINT opt_outs_source_known CHECK (source IN ('keyword', 'intent', 'error_code', 'operator'))
);
