CREATE FUNCTION billing_iso(ts timestamptz) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN date_part('microseconds', ts)::bigint % 1000000 <> 0
                THEN to_char(ts AT TIME ZONE 'UTC', '.US') ELSE '' END
        || '+00:00'
$$;
