-- Rollback of 006: drop in dependency order. This deletes accounts, API keys, the ledger's entries,
-- reservations and the payments group's projection (the sessions and contributions of 004 stay).
DROP TABLE IF EXISTS far_payment_weeks;
DROP TABLE IF EXISTS far_payment_items;
DROP TABLE IF EXISTS far_payment_sessions;
ALTER TABLE far_mesh_sessions DROP COLUMN IF EXISTS platform_fee;
ALTER TABLE far_mesh_sessions DROP COLUMN IF EXISTS account_id;
DROP TABLE IF EXISTS far_reservations;
DROP VIEW IF EXISTS far_account_balances;
DROP TABLE IF EXISTS far_ledger_entries;
DROP TABLE IF EXISTS far_ledger_transactions;
DROP TABLE IF EXISTS far_api_keys;
DROP TABLE IF EXISTS far_accounts;
