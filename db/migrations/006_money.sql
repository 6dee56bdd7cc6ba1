-- 006 money: accounts and API keys, a double-entry ledger, reservations, weekly payment batches.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).
-- Money is NUMERIC(38,18) (exact FAR); a balance is always the sum of an account's entries, never a column.

-- Who money belongs to. Clients hold prepaid balances (API keys), nodes earn (one account per peer id,
-- paid out to the wallet the registry knows), the platform earns the fee; two external accounts stand for
-- money entering (deposits: client credit) and leaving (payouts: paid payment batches).
CREATE TABLE far_accounts (
    account_id  UUID PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('client', 'node', 'platform', 'external')),
    name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    peer_id     TEXT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT far_accounts_node_peer_check CHECK ((kind = 'node') = (peer_id IS NOT NULL))
);
CREATE UNIQUE INDEX far_accounts_client_name_idx ON far_accounts (name) WHERE kind = 'client';

-- Fixed system accounts (farmesh/accounts.py names the same ids).
INSERT INTO far_accounts (account_id, kind, name) VALUES
    ('00000000-0000-4000-8000-000000000001', 'platform', 'platform-fees'),
    ('00000000-0000-4000-8000-000000000002', 'external', 'deposits'),
    ('00000000-0000-4000-8000-000000000003', 'external', 'payouts');

-- API keys: only a SHA-256 of the (high-entropy, random) key is stored; `prefix` identifies it to people.
CREATE TABLE far_api_keys (
    key_id      UUID PRIMARY KEY,
    account_id  UUID NOT NULL REFERENCES far_accounts (account_id),
    prefix      TEXT NOT NULL UNIQUE,
    key_hash    TEXT NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ NULL
);
CREATE INDEX far_api_keys_account_id_idx ON far_api_keys (account_id);

-- A posting: balanced entries that move money together. txn_id is the idempotency key: the event id of
-- the session outcome that caused a settlement, or the id of a deposit / payout operation.
CREATE TABLE far_ledger_transactions (
    txn_id      UUID PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('deposit', 'settlement', 'payout')),
    -- a settlement's session: at most one per request (the first outcome wins)
    request_id  TEXT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    occurred_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT far_ledger_transactions_settlement_check CHECK ((kind = 'settlement') = (request_id IS NOT NULL))
);
CREATE INDEX far_ledger_transactions_occurred_at_idx ON far_ledger_transactions (occurred_at);

CREATE TABLE far_ledger_entries (
    id              BIGSERIAL PRIMARY KEY,
    txn_id          UUID NOT NULL REFERENCES far_ledger_transactions (txn_id),
    account_id      UUID NOT NULL REFERENCES far_accounts (account_id),
    side            TEXT NOT NULL CHECK (side IN ('debit', 'credit')),
    amount          NUMERIC(38,18) NOT NULL CHECK (amount > 0),
    -- a node's credit for one contribution (its event id): each contribution is paid once
    contribution_id UUID NULL UNIQUE
);
CREATE INDEX far_ledger_entries_txn_id_idx ON far_ledger_entries (txn_id);
CREATE INDEX far_ledger_entries_account_id_idx ON far_ledger_entries (account_id);

-- Balance = credits - debits: what the platform owes the account (a client's prepaid balance, a node's
-- unpaid earnings, the platform's fees); the external accounts mirror money that came in or went out.
CREATE VIEW far_account_balances AS
SELECT a.account_id, a.kind, a.name, a.peer_id,
       COALESCE(sum(CASE WHEN e.side = 'credit' THEN e.amount ELSE 0 END), 0) AS credits,
       COALESCE(sum(CASE WHEN e.side = 'debit' THEN e.amount ELSE 0 END), 0) AS debits,
       COALESCE(sum(CASE WHEN e.side = 'credit' THEN e.amount ELSE -e.amount END), 0) AS balance
FROM far_accounts a LEFT JOIN far_ledger_entries e ON e.account_id = a.account_id
GROUP BY a.account_id, a.kind, a.name, a.peer_id;

-- What a request may cost at most (max_tokens x price), held on the client's balance from the moment the
-- gateway accepts it until the ledger settles it (status settled; released when it failed or never ran).
CREATE TABLE far_reservations (
    request_id       TEXT PRIMARY KEY,
    account_id       UUID NOT NULL REFERENCES far_accounts (account_id),
    key_id           UUID NULL REFERENCES far_api_keys (key_id),
    model            TEXT NOT NULL,
    max_tokens       INT NOT NULL CHECK (max_tokens > 0),
    price_per_token  NUMERIC(38,18) NOT NULL CHECK (price_per_token >= 0),
    platform_fee_rate NUMERIC(38,18) NOT NULL DEFAULT 0 CHECK (platform_fee_rate BETWEEN 0 AND 1),
    amount           NUMERIC(38,18) NOT NULL CHECK (amount >= 0),
    status           TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'released')),
    charged          NUMERIC(38,18) NULL CHECK (charged >= 0),
    -- the settlement transaction (the winning outcome's event id)
    settlement_txn   UUID NULL REFERENCES far_ledger_transactions (txn_id),
    reason           TEXT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at        TIMESTAMPTZ NULL,
    CONSTRAINT far_reservations_closed_check CHECK ((status = 'open') = (closed_at IS NULL))
);
CREATE INDEX far_reservations_open_idx ON far_reservations (account_id) WHERE status = 'open';

-- Sessions carry the paying account and the platform fee from now on (NULL: recorded before 006).
ALTER TABLE far_mesh_sessions ADD COLUMN account_id UUID NULL REFERENCES far_accounts (account_id);
ALTER TABLE far_mesh_sessions ADD COLUMN platform_fee NUMERIC(38,18) NULL CHECK (platform_fee >= 0);
CREATE INDEX far_mesh_sessions_account_id_idx ON far_mesh_sessions (account_id);

-- Consumer group `payments`: its own record of which outcome won each request (the same rule as the
-- ledger: the first valid outcome of a request_id), and the payable contributions of that outcome.
CREATE TABLE far_payment_sessions (
    request_id  TEXT PRIMARY KEY,
    event_id    UUID NOT NULL UNIQUE,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE far_payment_items (
    contribution_id UUID PRIMARY KEY,
    request_id      TEXT NOT NULL REFERENCES far_payment_sessions (request_id),
    peer_id         TEXT NOT NULL,
    -- the payout wallet the registry knew when the work was recorded (filled in at close if it was unknown)
    wallet          TEXT NULL,
    amount          NUMERIC(38,18) NOT NULL CHECK (amount >= 0),  -- 0: work of a session that charged nothing
    occurred_at     TIMESTAMPTZ NOT NULL,
    -- ISO week (UTC) of occurred_at: the batch the work belongs to
    week            TEXT NOT NULL CHECK (week ~ '^[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])$'),
    -- the batch line that pays it: set once, when a week closes (NULL: not paid yet / carried over)
    batch_id        BIGINT NULL REFERENCES far_payment_batches (id),
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX far_payment_items_unbatched_idx ON far_payment_items (week) WHERE batch_id IS NULL;
CREATE INDEX far_payment_items_batch_id_idx ON far_payment_items (batch_id);

-- A closed week (its lines are far_payment_batches rows of that week). Closing is idempotent.
CREATE TABLE far_payment_weeks (
    week                TEXT PRIMARY KEY CHECK (week ~ '^[0-9]{4}-W(0[1-9]|[1-4][0-9]|5[0-3])$'),
    event_id            UUID NOT NULL UNIQUE,
    min_payout          NUMERIC(38,18) NOT NULL CHECK (min_payout >= 0),
    lines               INT NOT NULL CHECK (lines >= 0),
    total               NUMERIC(38,18) NOT NULL CHECK (total >= 0),
    carried_over        NUMERIC(38,18) NOT NULL CHECK (carried_over >= 0),
    unpaid_no_wallet    NUMERIC(38,18) NOT NULL CHECK (unpaid_no_wallet >= 0),
    close_seconds       DOUBLE PRECISION NOT NULL DEFAULT 0,
    closed_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
