-- 009 clients and operators over HTTP: per-key limits, the rate counters that make them hold over every
-- gateway, credits idempotent by a caller-given id, and the admin audit trail.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).

-- Per-key limits (NULL: none). monthly_budget is FAR per calendar month (UTC), counted on the key's reservations:
-- what is held while a request runs, what was charged once it is settled.
ALTER TABLE far_api_keys ADD COLUMN requests_per_minute INT NULL CHECK (requests_per_minute BETWEEN 1 AND 1000000);
ALTER TABLE far_api_keys ADD COLUMN tokens_per_minute BIGINT NULL CHECK (tokens_per_minute BETWEEN 1 AND 1000000000);
ALTER TABLE far_api_keys ADD COLUMN monthly_budget NUMERIC(38,18) NULL CHECK (monthly_budget > 0);

-- One row per limited key and minute (UTC, date_trunc('minute', now()) of the admitting transaction): the requests
-- admitted and their tokens, counted on max_tokens at admission (farmesh/billing/accounts.py reserve, under the
-- account's row lock, so every gateway counts into the same row) and corrected by the ledger at settlement to the
-- tokens delivered (consumers/ledger/repository.py, once per reservation: only a newly posted settlement corrects).
CREATE TABLE far_rate_counters (
    key_id        UUID NOT NULL REFERENCES far_api_keys (key_id),
    window_start  TIMESTAMPTZ NOT NULL,
    requests      INT NOT NULL DEFAULT 0 CHECK (requests >= 0),
    tokens        BIGINT NOT NULL DEFAULT 0 CHECK (tokens >= 0),
    PRIMARY KEY (key_id, window_start)
);
-- The minute a reservation was counted in (NULL: its key had no rate limit, nothing to correct).
ALTER TABLE far_reservations ADD COLUMN rate_window TIMESTAMPTZ NULL;
-- A key's reservations by time: its spend this month (the budget) and its usage by key.
CREATE INDEX far_reservations_key_created_idx ON far_reservations (key_id, created_at);

-- Credits given with a caller's id (the admin API): a retried credit finds its id and posts nothing again.
CREATE TABLE far_credits (
    credit_id   TEXT PRIMARY KEY CHECK (length(credit_id) BETWEEN 1 AND 128),
    account_id  UUID NOT NULL REFERENCES far_accounts (account_id),
    amount      NUMERIC(38,18) NOT NULL CHECK (amount > 0),
    txn_id      UUID NOT NULL UNIQUE REFERENCES far_ledger_transactions (txn_id),
    description TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every admin API action: what, on what, when, from where (the peer address and the forwarded-for header).
CREATE TABLE far_admin_audit (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    action      TEXT NOT NULL,
    target      TEXT NULL,
    detail      JSONB NOT NULL DEFAULT '{}'::jsonb,
    remote_addr TEXT NULL,
    forwarded_for TEXT NULL,
    user_agent  TEXT NULL
);
CREATE INDEX far_admin_audit_at_idx ON far_admin_audit (at);
