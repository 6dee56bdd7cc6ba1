-- Rollback of 010: far_reserve as migration 007 made it, and no reply topic on reservations.
DROP FUNCTION IF EXISTS far_reserve(TEXT, TEXT, TEXT, INT, NUMERIC, NUMERIC, NUMERIC, TEXT, TIMESTAMPTZ, INT, TEXT);
ALTER FUNCTION far_reserve_steps(TEXT, TEXT, TEXT, INT, NUMERIC, NUMERIC, NUMERIC, TEXT, TIMESTAMPTZ, INT)
    RENAME TO far_reserve;
ALTER TABLE far_reservations DROP COLUMN IF EXISTS reply_topic;
