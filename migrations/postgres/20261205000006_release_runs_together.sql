-- Runs released together: at the shutdown deadline of a replica draining in handoff mode every run it drives is
-- released at once (its epoch raised, no owner) and announced on `p_channel`, so that a replica following it claims it
-- at once. Each release was a commit, and its announcement another: two round trips per run, thousands at once. Here
-- the releases waiting at the same moment go in one call: each run is released if it is still running under the epoch
-- given (`released` false otherwise: it was claimed meanwhile, or ended), and announced with the call's commit
-- (a notification is sent when its transaction commits). Each answer names its release by its place in `p_runs` (from
-- 0). The runs are locked in the order of their ids, as every statement that locks several runs locks them.

CREATE OR REPLACE FUNCTION agent_release_runs(p_runs JSONB, p_channel TEXT)
RETURNS TABLE (place INT, released BOOLEAN)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r RECORD;
    running TEXT := 'running';
    done BOOLEAN;
BEGIN
    FOR r IN SELECT (x.ordinality - 1)::INT AS at, (x.value->>'run')::UUID AS run, (x.value->>'epoch')::BIGINT AS epoch
        FROM jsonb_array_elements(p_runs) WITH ORDINALITY AS x ORDER BY 2, 1
    LOOP
        UPDATE agent_chat_runs SET owner_instance = '', epoch = epoch + 1, heartbeat_at = now()
            WHERE id = r.run AND epoch = r.epoch AND status = running;
        done := FOUND;
        IF done THEN
            PERFORM pg_notify(p_channel, r.run::TEXT);
        END IF;
        RETURN QUERY SELECT r.at, done;
    END LOOP;
END;
$$;
