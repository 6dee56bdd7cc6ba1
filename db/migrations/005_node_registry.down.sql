-- Rollback of 005: the registry's history and columns (far_nodes itself belongs to 004).
DROP INDEX IF EXISTS far_session_contributions_unregistered_idx;
ALTER TABLE far_session_contributions DROP COLUMN IF EXISTS unregistered;
DROP TABLE IF EXISTS far_node_state_changes;
DROP INDEX IF EXISTS far_nodes_live_last_seen_idx;
DROP INDEX IF EXISTS far_nodes_model_state_idx;
ALTER TABLE far_nodes
    DROP CONSTRAINT IF EXISTS far_nodes_blocks_check,
    DROP COLUMN IF EXISTS last_offset,
    DROP COLUMN IF EXISTS last_partition,
    DROP COLUMN IF EXISTS uptime_seconds,
    DROP COLUMN IF EXISTS online_since,
    DROP COLUMN IF EXISTS state_changed_at,
    DROP COLUMN IF EXISTS last_heartbeat_at,
    DROP COLUMN IF EXISTS heartbeat_interval,
    DROP COLUMN IF EXISTS total_blocks;
COMMENT ON COLUMN far_nodes.first_seen IS NULL;
COMMENT ON COLUMN far_nodes.last_seen IS NULL;
COMMENT ON COLUMN far_nodes.public_key IS NULL;
