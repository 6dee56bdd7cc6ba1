-- 010 a reservation names where its request's tokens go: the gateway's reply topic. A worker runs a request only
-- if it keeps to its reservation (farmesh/billing/acceptance.py request_problem), and that now includes the reply
-- topic, so a request forged with a reservation's exact terms and another reply topic is not run: its tokens would
-- go to whoever named that topic, and the reservation would be spent on them. NULL on reservations made before
-- this migration (and by a caller that names none): not checked.
-- Applied by db/migrate.py inside one transaction (no BEGIN/COMMIT here).

ALTER TABLE far_reservations ADD COLUMN reply_topic TEXT NULL CHECK (length(reply_topic) BETWEEN 1 AND 249);

-- far_reserve takes the reply topic as one more argument: migration 007's function does every step as before
-- (under the name far_reserve_steps), and a reservation it made gets the topic, in the same call (still one round
-- trip for the gateway, in the caller's transaction).
ALTER FUNCTION far_reserve(TEXT, TEXT, TEXT, INT, NUMERIC, NUMERIC, NUMERIC, TEXT, TIMESTAMPTZ, INT)
    RENAME TO far_reserve_steps;

CREATE FUNCTION far_reserve(
    p_key_hash TEXT, p_request_id TEXT, p_model TEXT, p_max_tokens INT, p_price NUMERIC, p_fee_rate NUMERIC,
    p_amount NUMERIC, p_request_hash TEXT, p_deadline TIMESTAMPTZ, p_max_pending INT, p_reply_topic TEXT)
RETURNS TABLE (outcome TEXT, account_id UUID, key_id UUID, prefix TEXT, name TEXT,
               existing_status TEXT, existing_deadline TIMESTAMPTZ,
               pending BIGINT, available NUMERIC)
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
BEGIN
    SELECT * INTO r FROM far_reserve_steps(p_key_hash, p_request_id, p_model, p_max_tokens, p_price, p_fee_rate,
                                           p_amount, p_request_hash, p_deadline, p_max_pending);
    IF r.outcome = 'reserved' THEN
        UPDATE far_reservations fr SET reply_topic = p_reply_topic WHERE fr.request_id = p_request_id;
    END IF;
    RETURN QUERY SELECT r.outcome, r.account_id, r.key_id, r.prefix, r.name, r.existing_status,
        r.existing_deadline, r.pending, r.available;
END
$$;
