-- 004 distributed inference: sessions, node registry, weekly payment batches, per-node contributions.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).
-- Money is NUMERIC(38,18): exact FAR amounts, never floating point.

CREATE TABLE far_mesh_sessions (
    request_id        TEXT PRIMARY KEY,
    -- the completed/failed event that recorded this session
    event_id          UUID NOT NULL UNIQUE,
    model             TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    prompt_tokens     INT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INT NOT NULL CHECK (completion_tokens >= 0),
    completion        TEXT NOT NULL,
    finish_reason     TEXT NULL,
    error             TEXT NULL,
    price_per_token   NUMERIC(38,18) NOT NULL CHECK (price_per_token >= 0),
    cost              NUMERIC(38,18) NOT NULL CHECK (cost >= 0),
    started_at        TIMESTAMPTZ NOT NULL,
    finished_at       TIMESTAMPTZ NOT NULL,
    worker            TEXT NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX far_mesh_sessions_finished_at_idx ON far_mesh_sessions (finished_at);

-- Provider registry (filled from node heartbeats).
CREATE TABLE far_nodes (
    peer_id           TEXT PRIMARY KEY,
    wallet            TEXT,
    model             TEXT,
    start_block       INT,
    end_block         INT,
    -- announced throughput in tokens/s (a measurement, not money)
    throughput        DOUBLE PRECISION,
    state             TEXT NOT NULL DEFAULT 'unknown'
                      CHECK (state IN ('unknown', 'joining', 'online', 'draining', 'offline')),
    version           TEXT,
    device            JSONB,
    public_key        TEXT,
    first_seen        TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen         TIMESTAMPTZ,
    last_heartbeat_id UUID
);

-- One open/closed/paid payout per ISO week and wallet.
CREATE TABLE far_payment_batches (
    id            BIGSERIAL PRIMARY KEY,
    week          TEXT NOT NULL CHECK (week ~ '^[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])$'),
    wallet        TEXT NOT NULL,
    amount        NUMERIC(38,18) NOT NULL DEFAULT 0 CHECK (amount >= 0),
    contributions INT NOT NULL DEFAULT 0 CHECK (contributions >= 0),
    status        TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed', 'paid')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at     TIMESTAMPTZ,
    paid_at       TIMESTAMPTZ,
    tx_ref        TEXT,
    UNIQUE (week, wallet)
);

-- Which peer served which blocks of a session, for how many tokens, and what it earned.
CREATE TABLE far_session_contributions (
    id               BIGSERIAL PRIMARY KEY,
    event_id         UUID NOT NULL UNIQUE,
    request_id       TEXT NOT NULL REFERENCES far_mesh_sessions (request_id),
    model            TEXT NOT NULL,
    -- no foreign key: a serving node may be unknown to the registry
    peer_id          TEXT NOT NULL,
    wallet           TEXT NULL,
    start_block      INT NOT NULL CHECK (start_block >= 0),
    end_block        INT NOT NULL,
    tokens_processed INT NOT NULL CHECK (tokens_processed >= 0),
    earnings         NUMERIC(38,18) NOT NULL CHECK (earnings >= 0),
    occurred_at      TIMESTAMPTZ NOT NULL,  -- event time
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    payment_batch_id BIGINT NULL REFERENCES far_payment_batches (id),
    CONSTRAINT far_session_contributions_blocks_check CHECK (end_block > start_block),
    UNIQUE (request_id, peer_id, start_block, end_block)
);
CREATE INDEX far_session_contributions_peer_id_idx ON far_session_contributions (peer_id);
CREATE INDEX far_session_contributions_occurred_at_idx ON far_session_contributions (occurred_at);
CREATE INDEX far_session_contributions_payment_batch_id_idx ON far_session_contributions (payment_batch_id);
