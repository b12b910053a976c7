CREATE FUNCTION billing_period_boundary(anchor timestamptz, unit text, intervals integer)
RETURNS timestamptz LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT ((anchor AT TIME ZONE 'UTC') + CASE unit
                WHEN 'month' THEN make_interval(months => intervals)
                WHEN 'day' THEN make_interval(days => intervals) END) AT TIME ZONE 'UTC'
$$;
