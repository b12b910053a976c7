-- The replica-safe "has credits" flag (account_entitlements.has_credits):
-- true while the balance is above zero and no usage is owed.  A trigger on
-- accounts writes it in the transaction of every change of either column,
-- whichever statement makes it (a debit, a credit, an owed amount
-- collected), so a gateway reading it on a replica is never staler than
-- replication lag, with no refresh job.  The update trigger fires only when
-- the flag changes.
CREATE FUNCTION billing_has_credits_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO account_entitlements (account_id, has_credits, updated_at)
        VALUES (NEW.id, NEW.balance_micros > 0 AND NEW.owed_micros = 0, NEW.updated_at)
        ON CONFLICT (account_id) DO UPDATE SET has_credits = EXCLUDED.has_credits, updated_at = EXCLUDED.updated_at;
    RETURN NULL;
END
$$;
