-- Rollback of 007: cancelled and expired sessions become failed again (as 006 knew them).
DROP FUNCTION IF EXISTS far_reserve(TEXT, TEXT, TEXT, INT, NUMERIC, NUMERIC, NUMERIC, TEXT, TIMESTAMPTZ, INT);
DROP INDEX IF EXISTS far_reservations_pending_idx;
ALTER TABLE far_reservations DROP COLUMN IF EXISTS deadline;
ALTER TABLE far_reservations DROP COLUMN IF EXISTS request_hash;
ALTER TABLE far_mesh_sessions DROP CONSTRAINT IF EXISTS far_mesh_sessions_status_check;
UPDATE far_mesh_sessions SET status = 'failed' WHERE status IN ('cancelled', 'expired');
ALTER TABLE far_mesh_sessions ADD CONSTRAINT far_mesh_sessions_status_check CHECK (status IN ('completed', 'failed'));
