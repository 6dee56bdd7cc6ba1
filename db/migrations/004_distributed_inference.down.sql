-- Rollback of 004: drop in dependency order. This deletes the recorded sessions and earnings.
DROP TABLE IF EXISTS far_session_contributions;
DROP TABLE IF EXISTS far_payment_batches;
DROP TABLE IF EXISTS far_nodes;
DROP TABLE IF EXISTS far_mesh_sessions;
