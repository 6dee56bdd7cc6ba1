-- Rollback of 008: the per-item pointers come back, filled from the membership rule (what 008 replaced).
ALTER TABLE far_payment_items ADD COLUMN batch_id BIGINT NULL REFERENCES far_payment_batches (id);
ALTER TABLE far_session_contributions ADD COLUMN payment_batch_id BIGINT NULL REFERENCES far_payment_batches (id);
UPDATE far_payment_items i SET batch_id = v.line_id
FROM far_payment_item_lines v WHERE v.contribution_id = i.contribution_id;
UPDATE far_session_contributions c SET payment_batch_id = v.line_id
FROM far_payment_item_lines v WHERE v.contribution_id = c.event_id;
CREATE INDEX far_payment_items_unbatched_idx ON far_payment_items (week) WHERE batch_id IS NULL;
CREATE INDEX far_payment_items_batch_id_idx ON far_payment_items (batch_id);
CREATE INDEX far_session_contributions_payment_batch_id_idx ON far_session_contributions (payment_batch_id);
DROP VIEW IF EXISTS far_payment_item_lines;
DROP INDEX IF EXISTS far_payment_batches_wallet_week_idx;
DROP INDEX IF EXISTS far_payment_items_no_wallet_idx;
DROP INDEX IF EXISTS far_payment_items_wallet_week_idx;
DROP INDEX IF EXISTS far_payment_items_wallet_seq_idx;
ALTER TABLE far_payment_batches DROP CONSTRAINT IF EXISTS far_payment_batches_through_seq_open_check;
ALTER TABLE far_payment_batches DROP COLUMN IF EXISTS through_seq;
ALTER TABLE far_payment_items DROP COLUMN IF EXISTS seq;  -- and its identity sequence
