CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % of entry % refused (post an adjustment instead)',
        TG_OP, OLD.id USING ERRCODE = 'insufficient_privilege';
END
$$;
