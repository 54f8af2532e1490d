-- Run inside schema.sql's transaction (before its COMMIT), with the triggers it creates, when
-- the file had no ``key_counts`` yet: the counts of the rows an older version wrote. Whoever
-- creates the table fills it in the same transaction, so a file that has it is filled.
INSERT OR IGNORE INTO key_counts
    SELECT key_id, 'objects', COUNT(*) FROM objects GROUP BY key_id;
INSERT OR IGNORE INTO key_counts
    SELECT key_id, 'idempotency', COUNT(*) FROM idempotency_entries GROUP BY key_id;
