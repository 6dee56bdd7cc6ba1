-- 008 payment batch membership by rule: closing a week writes its lines, never its items.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).
--
-- Before: closing set far_payment_items.batch_id and far_session_contributions.payment_batch_id on every
-- paid item (two non-HOT updates per contribution, 1M contributions: 75 s). Now membership is a rule:
--
--   far_payment_items.seq           the order in which an item became payable (recorded with a wallet, or
--                                   given the wallet the registry knows at a close): identity, only grows
--   far_payment_batches.through_seq the highest seq that existed when the line's week was closed
--                                   (set with the line; NULL exactly while a line is 'open')
--
--   an item (amount > 0) belongs to the FIRST line, in close order (= week order), of its wallet with
--   item.seq <= line.through_seq AND item.week <= line.week; no such line: it is not paid yet.
--
-- Closes are serialised and in week order, and through_seq is the sequence's high-water mark at the close,
-- so a wallet's lines nest: both week and through_seq grow from one line to the next (the audit checks it).
-- Hence the first line whose (through_seq, week) bound holds an item is the one whose bound holds it while
-- the wallet's previous line's bound does not, and an item is open iff its wallet's LAST line does not hold
-- it. far_payment_item_lines is that rule, the one place that says which line pays which contribution.

ALTER TABLE far_payment_items ADD COLUMN seq BIGINT;
-- Backfill in an order the rule reproduces: the items of each closed line (lines in close order: week,
-- then id), then the open items in recorded order.
UPDATE far_payment_items i SET seq = o.n
FROM (SELECT i.contribution_id,
             row_number() OVER (ORDER BY l.week NULLS LAST, l.id NULLS LAST, i.recorded_at, i.contribution_id) AS n
      FROM far_payment_items i LEFT JOIN far_payment_batches l ON l.id = i.batch_id) o
WHERE o.contribution_id = i.contribution_id;
ALTER TABLE far_payment_items ALTER COLUMN seq SET NOT NULL;
ALTER TABLE far_payment_items ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME far_payment_items_seq_seq);
SELECT setval('far_payment_items_seq_seq', COALESCE(max(seq), 0) + 1, false) FROM far_payment_items;

ALTER TABLE far_payment_batches ADD COLUMN through_seq BIGINT NULL CHECK (through_seq >= 0);
-- Existing closed lines: the highest seq of their wallet's items paid so far (by them or an earlier line).
UPDATE far_payment_batches b SET through_seq = t.through_seq
FROM (SELECT l.id, COALESCE(max(m.top) OVER (PARTITION BY l.wallet ORDER BY l.week, l.id), 0) AS through_seq
      FROM far_payment_batches l
      LEFT JOIN (SELECT batch_id, max(seq) AS top FROM far_payment_items WHERE batch_id IS NOT NULL
                 GROUP BY batch_id) m ON m.batch_id = l.id
      WHERE l.status <> 'open') t
WHERE t.id = b.id;
ALTER TABLE far_payment_batches ADD CONSTRAINT far_payment_batches_through_seq_open_check
    CHECK ((status = 'open') = (through_seq IS NULL));

CREATE VIEW far_payment_item_lines AS
SELECT i.contribution_id, l.id AS line_id, l.week AS line_week, i.request_id, i.peer_id, i.wallet, i.amount,
       i.week, i.seq
FROM (SELECT id, wallet, week, through_seq,
             lag(week) OVER w AS prev_week, lag(through_seq) OVER w AS prev_through_seq
      FROM far_payment_batches WHERE through_seq IS NOT NULL
      WINDOW w AS (PARTITION BY wallet ORDER BY week)) l
JOIN far_payment_items i
  ON i.wallet = l.wallet AND i.amount > 0 AND i.seq <= l.through_seq AND i.week <= l.week
 -- not held by the wallet's previous line (written as two ranges: by seq since it closed, by weeks since its week)
 AND ((i.seq > COALESCE(l.prev_through_seq, -1) AND i.seq <= l.through_seq)
      OR (i.week > COALESCE(l.prev_week, '') AND i.week <= l.week));
COMMENT ON VIEW far_payment_item_lines IS
    'Which batch line pays each contribution: the first line of its wallet (week order) with seq <= through_seq '
    'and week <= the line''s week (lines of a wallet nest, so: held by the line, not by the previous one)';

-- The rule must reproduce every recorded assignment before the pointers go.
DO $$
DECLARE
    bad RECORD;
    n BIGINT;
BEGIN
    SELECT count(*) INTO n FROM (
        SELECT wallet FROM (SELECT wallet, through_seq, lag(through_seq) OVER (PARTITION BY wallet ORDER BY week) AS prev
                            FROM far_payment_batches WHERE through_seq IS NOT NULL) x
        WHERE through_seq < prev) y;
    IF n > 0 THEN
        RAISE EXCEPTION '008: % payment batch line(s) hold a lower through_seq than an earlier line of their wallet', n;
    END IF;
    SELECT count(*) INTO n FROM far_payment_items i
    LEFT JOIN far_payment_item_lines v USING (contribution_id)
    WHERE v.line_id IS DISTINCT FROM i.batch_id;
    IF n > 0 THEN
        SELECT i.contribution_id, i.batch_id, v.line_id INTO bad FROM far_payment_items i
        LEFT JOIN far_payment_item_lines v USING (contribution_id)
        WHERE v.line_id IS DISTINCT FROM i.batch_id LIMIT 1;
        RAISE EXCEPTION '008: the membership rule differs from the recorded batch for % item(s), e.g. % (batch_id %, rule %)',
            n, bad.contribution_id, bad.batch_id, bad.line_id;
    END IF;
END
$$;

-- The pointers go: membership is the rule (and the ledger's side joins far_payment_item_lines on
-- contribution_id = far_session_contributions.event_id).
ALTER TABLE far_payment_items DROP COLUMN batch_id;             -- with far_payment_items_unbatched_idx, _batch_id_idx
ALTER TABLE far_session_contributions DROP COLUMN payment_batch_id;  -- with its index
-- A line's items: by the range of seq since the wallet's previous line, or by the weeks since its week.
CREATE INDEX far_payment_items_wallet_seq_idx ON far_payment_items (wallet, seq);
CREATE INDEX far_payment_items_wallet_week_idx ON far_payment_items (wallet, week);
-- Work recorded before its node had a wallet: given one (and a new seq) at the next close that knows it.
CREATE INDEX far_payment_items_no_wallet_idx ON far_payment_items (peer_id) WHERE wallet IS NULL;
CREATE INDEX far_payment_batches_wallet_week_idx ON far_payment_batches (wallet, week);
