-- The alert outbox of the SQLite store (`keybrake.store.alerts`), created at first use in
-- one transaction (every statement is IF NOT EXISTS).
BEGIN IMMEDIATE;
-- One row per alert that fired: its dedupe key (node, threshold, window) is the primary key,
-- so an INSERT OR IGNORE decides "first" atomically. Daily windows expire (expires_at).
CREATE TABLE IF NOT EXISTS alert_fired (
    dedupe TEXT PRIMARY KEY,
    fired_at INTEGER NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS alert_fired_expiry ON alert_fired (expires_at);
-- Deliveries waiting (one per alert and webhook), due at next_at (epoch ms).
CREATE TABLE IF NOT EXISTS alert_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row TEXT NOT NULL,
    next_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (next_at);
-- Finished deliveries (delivered or given up), the most recent kept.
CREATE TABLE IF NOT EXISTS alert_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row TEXT NOT NULL
);
COMMIT;
