-- The SQLite store's tables, indexes and triggers: run by `SQLiteStore` at every open, in one
-- transaction (every statement is IF NOT EXISTS).
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    vendor TEXT NOT NULL,
    agent_run_label TEXT NOT NULL,
    daily_cap_micros INTEGER NOT NULL,
    usd_cap_micros INTEGER,
    allowed_endpoints TEXT NOT NULL,
    vendor_account TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    max_requests_per_minute INTEGER,
    allowed_accounts TEXT NOT NULL DEFAULT '[]',
    suspended_at INTEGER,
    suspended_reason TEXT,
    share_objects TEXT NOT NULL DEFAULT 'none',
    issuer_id TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_creation ON keys (created_at, key_id);
CREATE TABLE IF NOT EXISTS issuers (
    issuer_id TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    vendors TEXT NOT NULL,
    label_prefix TEXT NOT NULL,
    allowed_endpoints TEXT NOT NULL,
    max_daily_cap_micros INTEGER NOT NULL,
    max_usd_cap_micros INTEGER,
    max_expires_in_seconds INTEGER NOT NULL,
    allowed_accounts TEXT NOT NULL,
    budget_daily_micros INTEGER,
    budget_lifetime_micros INTEGER,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS frozen_vendors (
    vendor TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    frozen_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS label_budgets (
    label TEXT PRIMARY KEY,
    daily_cap_micros INTEGER NOT NULL
);
-- The rest of a label node's limits (its daily cap is in label_budgets).
CREATE TABLE IF NOT EXISTS label_limits (
    label TEXT PRIMARY KEY,
    lifetime_cap_micros INTEGER,
    max_requests_per_minute INTEGER
);
-- The budget tree a label's keys are in, fixed by its first key: the issuer id, '' for the
-- operator's (keys issued with the admin token). A label never has keys in two trees.
CREATE TABLE IF NOT EXISTS label_homes (
    label TEXT PRIMARY KEY,
    issuer_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_label ON keys (agent_run_label);
CREATE TABLE IF NOT EXISTS budget_usage (
    scope TEXT NOT NULL,
    "window" TEXT NOT NULL,
    spent_micros INTEGER NOT NULL DEFAULT 0,
    reserved_micros INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, "window")
) WITHOUT ROWID;
-- Reservations of calls in flight, deleted when they finish (their amounts are then in
-- budget_usage and the audit row): a table of a few pages and no second index, as every paid
-- call inserts and deletes a row. Earlier versions kept every reservation in `reservations`
-- (with its state and two more indexes); `SQLiteStore` moves the open ones here at open.
CREATE TABLE IF NOT EXISTS open_reservations (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    budgets TEXT NOT NULL,
    estimate_micros INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holds (
    reservation_id TEXT PRIMARY KEY,
    vendor TEXT NOT NULL,
    object_id TEXT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_object ON holds (vendor, object_id);
CREATE TABLE IF NOT EXISTS key_amounts (
    key_id TEXT NOT NULL,
    vendor TEXT NOT NULL,
    object_id TEXT NOT NULL,
    micros INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, vendor, object_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    vendor TEXT NOT NULL,
    object_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    label TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (vendor, object_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_key ON objects (key_id, expires_at);
CREATE TABLE IF NOT EXISTS request_counts (
    key_id TEXT NOT NULL,
    bucket INTEGER NOT NULL,  -- 5-second buckets since the epoch
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency_entries (
    key_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_flight', 'done')),
    status_code INTEGER,
    headers TEXT,
    body BLOB,
    started_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (key_id, scope)
);
CREATE INDEX IF NOT EXISTS idempotency_by_expiry ON idempotency_entries (key_id, expires_at);
-- How many objects and idempotency entries each key holds, kept by triggers so that the
-- quota checks on the hot path read one row instead of counting the key's rows (a key near
-- its 100,000-object quota made every admission count 100,000 index entries). Rows past
-- their expiry still count until they are deleted: admission deletes the key's expired ones
-- first. Filled from the tables once for a database made before the counts existed.
CREATE TABLE IF NOT EXISTS key_counts (
    key_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('objects', 'idempotency')),
    n INTEGER NOT NULL,
    PRIMARY KEY (key_id, kind)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS objects_counted AFTER INSERT ON objects BEGIN
    INSERT INTO key_counts VALUES (NEW.key_id, 'objects', 1)
        ON CONFLICT (key_id, kind) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS objects_uncounted AFTER DELETE ON objects BEGIN
    UPDATE key_counts SET n = n - 1 WHERE key_id = OLD.key_id AND kind = 'objects';
END;
CREATE TRIGGER IF NOT EXISTS idempotency_counted AFTER INSERT ON idempotency_entries BEGIN
    INSERT INTO key_counts VALUES (NEW.key_id, 'idempotency', 1)
        ON CONFLICT (key_id, kind) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS idempotency_uncounted AFTER DELETE ON idempotency_entries BEGIN
    UPDATE key_counts SET n = n - 1 WHERE key_id = OLD.key_id AND kind = 'idempotency';
END;
COMMIT;
