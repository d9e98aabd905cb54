-- Run ends committed together: the ends that wait for a connection at the same moment (thousands of clients leaving
-- together, each of their runs ending) go in one call, one round trip and one commit, rather than one each. Each end
-- is the end of `agent_finish_run`, called in turn, so each is answered as if alone: `ended` is false for a run no
-- longer running under the epoch given, and nothing of it is written. Each answer names its end by its place in
-- `p_ends` (from 0).
--
-- The call first locks the runs it ends, in the order of their ids, then their chats, in the order of theirs. Every
-- statement that locks several runs locks them in the order of their ids (the heartbeat, a claim, the follower notes,
-- the marking of stale runs); run starts lock chats only, in the order of their ids (`agent_start_runs`). So no two
-- transactions wait for each other in a circle. Each run and chat is found by its key, one at a time, whatever the
-- planner thinks of the tables' sizes.
--
-- An end the store refuses (text it cannot hold) fails the call, and nothing of it is kept; the caller then makes each
-- end alone. The single end stays for replicas of earlier versions during a rolling deploy.

CREATE OR REPLACE FUNCTION agent_finish_runs(p_ends JSONB)
RETURNS TABLE (place INT, ended BOOLEAN)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    run UUID;
    chat UUID;
    chats UUID[] := '{}';
    e RECORD;
BEGIN
    FOR run IN SELECT (x.value->>'run')::UUID FROM jsonb_array_elements(p_ends) AS x ORDER BY 1 LOOP
        SELECT r.chat_id INTO chat FROM agent_chat_runs r WHERE r.id = run FOR NO KEY UPDATE;
        IF chat IS NOT NULL THEN
            chats := chats || chat;
        END IF;
    END LOOP;
    FOR chat IN SELECT DISTINCT c FROM unnest(chats) AS c ORDER BY 1 LOOP
        PERFORM 1 FROM agent_chats c WHERE c.id = chat FOR NO KEY UPDATE;
    END LOOP;
    FOR e IN SELECT (x.ordinality - 1)::INT AS at, x.value AS v FROM jsonb_array_elements(p_ends) WITH ORDINALITY AS x
    LOOP
        RETURN QUERY SELECT e.at, agent_finish_run((e.v->>'run')::UUID, (e.v->>'epoch')::BIGINT, e.v->>'status',
            e.v->>'error', e.v->>'output', (e.v->>'input_tokens')::BIGINT, (e.v->>'output_tokens')::BIGINT,
            (e.v->>'total_tokens')::BIGINT, e.v->'messages');
    END LOOP;
END;
$$;
