-- A MessageUUID names one message: still unique, now checked at the end of each statement
-- (DEFERRABLE INITIALLY IMMEDIATE) instead of at each row's index insertion.
--
-- Why: two status consumers can write the first callbacks of a message smsflow did not send at
-- the same moment. Both derive the same row id from the MessageUUID, so the status upsert's
-- ON CONFLICT (id) makes the second wait for the first and update its row. But a row-time check
-- of this second unique index ran before that: the second insert, having found no row by id
-- yet, waited on the MessageUUID's index entry and failed with a unique violation, and its
-- whole batch was rolled back and retried. Checked at statement end, the second insert's
-- conflict on the id is seen first, its tuple withdrawn, and the upsert proceeds.
--
-- Nothing uses this constraint as an ON CONFLICT arbiter or a foreign key target (neither is
-- allowed on a deferrable constraint). Rebuilding the index locks `messages` for its duration:
-- on a large table, apply in a quiet period.

ALTER TABLE messages
    DROP CONSTRAINT messages_message_uuid_key,
    ADD CONSTRAINT messages_message_uuid_key UNIQUE (message_uuid) DEFERRABLE INITIALLY IMMEDIATE;
