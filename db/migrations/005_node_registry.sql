-- 005 node registry: what the `registry` consumer group keeps from signed node heartbeats.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).
--
-- Invariant: a far_nodes row exists only for a peer with at least one accepted (validly signed) heartbeat,
-- so far_nodes.wallet is never NULL and a contribution recorded with wallet NULL (the ledger LEFT JOINs
-- far_nodes) is work by a node the registry did not know: unpaid, flagged by `unregistered` below.
--
-- Every column is derived from the heartbeat topic alone (event fields and log positions/times), never from
-- the wall clock of the registry, so replaying the topic from the beginning rebuilds the same rows.

ALTER TABLE far_nodes
    -- blocks of the whole model, from the heartbeats (for coverage and gaps)
    ADD COLUMN total_blocks       INT NULL CHECK (total_blocks > 0),
    -- seconds between the node's heartbeats (as it announces them)
    ADD COLUMN heartbeat_interval DOUBLE PRECISION NULL CHECK (heartbeat_interval > 0),
    -- occurred_at of the last accepted heartbeat (the node's signed clock): newer ones only are accepted
    ADD COLUMN last_heartbeat_at  TIMESTAMPTZ NULL,
    -- when the current state began (event time of the heartbeat or time-out that set it)
    ADD COLUMN state_changed_at   TIMESTAMPTZ NULL,
    -- start of the current online period (NULL when not online)
    ADD COLUMN online_since       TIMESTAMPTZ NULL,
    -- online time of the finished online periods (a current one is online_since .. now)
    ADD COLUMN uptime_seconds     DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (uptime_seconds >= 0),
    -- log position of the last event applied for this peer (a redelivered record is recognised by it)
    ADD COLUMN last_partition     INT NULL,
    ADD COLUMN last_offset        BIGINT NULL,
    ADD CONSTRAINT far_nodes_blocks_check CHECK (
        start_block IS NULL OR (start_block >= 0 AND end_block > start_block
                                AND (total_blocks IS NULL OR end_block <= total_blocks)));
COMMENT ON COLUMN far_nodes.first_seen IS 'log time of the first accepted heartbeat';
COMMENT ON COLUMN far_nodes.last_seen IS 'log time of the last accepted heartbeat (time-outs are judged on it)';
COMMENT ON COLUMN far_nodes.public_key IS 'libp2p public key (protobuf, base64) behind peer_id; pinned';
CREATE INDEX far_nodes_model_state_idx ON far_nodes (model, state);
CREATE INDEX far_nodes_live_last_seen_idx ON far_nodes (last_seen) WHERE state IN ('joining', 'online', 'draining');

-- Every state change of every node, in event order.
CREATE TABLE far_node_state_changes (
    id          BIGSERIAL PRIMARY KEY,
    peer_id     TEXT NOT NULL REFERENCES far_nodes (peer_id),
    -- NULL: the node's first accepted heartbeat
    from_state  TEXT NULL CHECK (from_state IN ('joining', 'online', 'draining', 'offline')),
    to_state    TEXT NOT NULL CHECK (to_state IN ('joining', 'online', 'draining', 'offline')),
    -- event time of the heartbeat (node clock) or of the registry's time-out decision
    at          TIMESTAMPTZ NOT NULL,
    -- the heartbeat or node.timed_out event that caused it
    event_id    UUID NOT NULL UNIQUE,
    reason      TEXT NOT NULL CHECK (reason IN ('heartbeat', 'timeout')),
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX far_node_state_changes_peer_id_idx ON far_node_state_changes (peer_id, id);

-- Work by a node with no valid heartbeat when it was recorded: no wallet, not paid, flagged.
ALTER TABLE far_session_contributions
    ADD COLUMN unregistered BOOLEAN GENERATED ALWAYS AS (wallet IS NULL) STORED;
CREATE INDEX far_session_contributions_unregistered_idx ON far_session_contributions (peer_id) WHERE unregistered;
