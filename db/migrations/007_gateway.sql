-- 007 gateway (OpenAI-compatible API, scale-out): how a session ended, idempotent requests, deadlines and
-- bounded queues. Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).

-- A session that did not complete failed (the generation broke), was cancelled (its client went away) or
-- expired (a worker picked it up after its deadline and never ran it: charged nothing).
ALTER TABLE far_mesh_sessions DROP CONSTRAINT far_mesh_sessions_status_check;
ALTER TABLE far_mesh_sessions ADD CONSTRAINT far_mesh_sessions_status_check
    CHECK (status IN ('completed', 'failed', 'cancelled', 'expired'));

-- request_hash: SHA-256 of what was asked (endpoint, model, prompt, sampling, max_tokens), so a repeated
-- request_id / Idempotency-Key with other parameters is refused instead of answered with another result.
-- deadline: when a worker must have started it; an open reservation past its deadline no longer counts as
-- pending. reply_topic: the asking gateway's reply topic (a retry on that gateway joins the live stream).
ALTER TABLE far_reservations ADD COLUMN request_hash TEXT NULL CHECK (request_hash ~ '^[0-9a-f]{64}$');
ALTER TABLE far_reservations ADD COLUMN deadline TIMESTAMPTZ NULL;
ALTER TABLE far_reservations ADD COLUMN reply_topic TEXT NULL;
-- Pending requests per model (the gateway's bounded queue: 429 beyond it).
CREATE INDEX far_reservations_pending_idx ON far_reservations (model, deadline) WHERE status = 'open';
