-- The eva-ws transactional outbox (docs/outbox.md). Idempotent: running it again changes nothing.
-- A backend inserts events here in the same transaction as its own change; the eva-ws pods
-- (EVA_WS_OUTBOX_DSN) publish every committed row once, in commit order per channel, then delete it.

CREATE TABLE IF NOT EXISTS eva_ws_outbox (
    -- Drawn by the trigger below after the channel's lock: within a channel, id order is commit order.
    id bigint PRIMARY KEY,
    -- The event's stream, as eva-ws names it: 'transactions:<customerId>', 'user_updates:<userId>'
    -- or 'notifications:<userId>'. The relay checks that it matches the event.
    channel text NOT NULL,
    -- One event object exactly as POST /api/v1/publish takes it: type, data, and channel,
    -- userId, correlationId where needed. Its idempotencyKey is replaced by 'outbox:<id>'.
    event jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE SEQUENCE IF NOT EXISTS eva_ws_outbox_id_seq AS bigint OWNED BY eva_ws_outbox.id;
CREATE INDEX IF NOT EXISTS eva_ws_outbox_channel_id ON eva_ws_outbox (channel, id);

-- Rows the relay could not publish (an event POST /api/v1/publish would refuse), kept for a person to read.
CREATE TABLE IF NOT EXISTS eva_ws_outbox_rejected (
    id bigint PRIMARY KEY,
    channel text NOT NULL,
    event jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    rejected_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    error text NOT NULL
);

-- Writers of one channel take turns from their insert to their commit (a transaction-level
-- advisory lock in the namespace 1702257015), and the id is drawn once the turn is theirs:
-- so a later id of a channel always belongs to a later commit. Other channels do not wait.
CREATE OR REPLACE FUNCTION eva_ws_outbox_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1702257015, hashtext(NEW.channel));
    NEW.id := nextval('eva_ws_outbox_id_seq');
    RETURN NEW;
END
$$;

-- Wakes the relays at commit (a NOTIFY is delivered only if the transaction commits).
CREATE OR REPLACE FUNCTION eva_ws_outbox_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('eva_ws_outbox', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER eva_ws_outbox_before_insert
    BEFORE INSERT ON eva_ws_outbox FOR EACH ROW EXECUTE FUNCTION eva_ws_outbox_before_insert();
CREATE OR REPLACE TRIGGER eva_ws_outbox_after_insert
    AFTER INSERT ON eva_ws_outbox FOR EACH STATEMENT EXECUTE FUNCTION eva_ws_outbox_after_insert();
