-- 010 a reservation names where its request's tokens go: the gateway's reply topic. A worker runs a request only
-- if it keeps to its reservation (farmesh/billing/acceptance.py request_problem), and that now includes the reply
-- topic, so a request forged with a reservation's exact terms and another reply topic is not run: its tokens would
-- go to whoever named that topic, and the reservation would be spent on them. NULL on reservations made before
-- this migration (and by a caller that names none): not checked.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).

ALTER TABLE far_reservations ADD COLUMN reply_topic TEXT NULL CHECK (length(reply_topic) BETWEEN 1 AND 249);

-- far_reserve (migration 007) with one more argument, stored on the reservation; otherwise the same steps.
DROP FUNCTION far_reserve(TEXT, TEXT, TEXT, INT, NUMERIC, NUMERIC, NUMERIC, TEXT, TIMESTAMPTZ, INT);
CREATE FUNCTION far_reserve(
    p_key_hash TEXT, p_request_id TEXT, p_model TEXT, p_max_tokens INT, p_price NUMERIC, p_fee_rate NUMERIC,
    p_amount NUMERIC, p_request_hash TEXT, p_deadline TIMESTAMPTZ, p_max_pending INT, p_reply_topic TEXT)
RETURNS TABLE (outcome TEXT, account_id UUID, key_id UUID, prefix TEXT, name TEXT,
               existing_status TEXT, existing_deadline TIMESTAMPTZ,
               pending BIGINT, available NUMERIC)
LANGUAGE plpgsql AS $$
DECLARE
    k RECORD;
    r RECORD;
    n BIGINT;
    have NUMERIC;
BEGIN
    SELECT ak.key_id, ak.prefix, ak.revoked_at, a.account_id, a.name INTO k
    FROM far_api_keys ak JOIN far_accounts a ON a.account_id = ak.account_id
    WHERE ak.key_hash = p_key_hash AND a.kind = 'client';
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'unknown_key', NULL::uuid, NULL::uuid, NULL::text, NULL::text, NULL::text,
            NULL::timestamptz, NULL::bigint, NULL::numeric;
        RETURN;
    END IF;
    IF k.revoked_at IS NOT NULL THEN
        RETURN QUERY SELECT 'revoked', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
            NULL::timestamptz, NULL::bigint, NULL::numeric;
        RETURN;
    END IF;
    PERFORM 1 FROM far_accounts WHERE far_accounts.account_id = k.account_id FOR NO KEY UPDATE;

    SELECT fr.account_id, fr.status, fr.request_hash, fr.deadline INTO r
    FROM far_reservations fr WHERE fr.request_id = p_request_id;
    IF FOUND THEN
        RETURN QUERY SELECT
            CASE WHEN r.account_id <> k.account_id THEN 'duplicate'
                 WHEN r.request_hash IS NOT NULL AND p_request_hash IS NOT NULL AND r.request_hash <> p_request_hash
                     THEN 'parameters_differ'
                 ELSE 'already' END,
            k.account_id, k.key_id, k.prefix, k.name, r.status, r.deadline, NULL::bigint, NULL::numeric;
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM far_mesh_sessions s WHERE s.request_id = p_request_id) THEN
        RETURN QUERY SELECT 'duplicate', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
            NULL::timestamptz, NULL::bigint, NULL::numeric;
        RETURN;
    END IF;

    IF p_max_pending IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('farmesh-pending:' || p_model));
        SELECT count(*) INTO n FROM far_reservations fr
        WHERE fr.model = p_model AND fr.status = 'open' AND fr.deadline > now();
        IF n >= p_max_pending THEN
            RETURN QUERY SELECT 'queue_full', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
                NULL::timestamptz, n, NULL::numeric;
            RETURN;
        END IF;
    END IF;

    SELECT COALESCE((SELECT sum(CASE WHEN e.side = 'credit' THEN e.amount ELSE -e.amount END)
                     FROM far_ledger_entries e WHERE e.account_id = k.account_id), 0)
         - COALESCE((SELECT sum(fr.amount) FROM far_reservations fr
                     WHERE fr.account_id = k.account_id AND fr.status = 'open'), 0) INTO have;
    IF have < p_amount THEN
        RETURN QUERY SELECT 'insufficient', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
            NULL::timestamptz, n, GREATEST(have, 0);
        RETURN;
    END IF;

    INSERT INTO far_reservations (request_id, account_id, key_id, model, max_tokens, price_per_token,
        platform_fee_rate, amount, request_hash, deadline, reply_topic)
    VALUES (p_request_id, k.account_id, k.key_id, p_model, p_max_tokens, p_price, p_fee_rate, p_amount,
        p_request_hash, p_deadline, p_reply_topic)
    ON CONFLICT (request_id) DO NOTHING;
    IF NOT FOUND THEN  -- another account's request took the id meanwhile (the same account waits on its lock)
        RETURN QUERY SELECT 'duplicate', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
            NULL::timestamptz, n, have;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'reserved', k.account_id, k.key_id, k.prefix, k.name, NULL::text,
        NULL::timestamptz, n, have;
END
$$;
