-- Run starts committed together: the starts that wait for a connection at the same moment (a burst, a deploy's
-- clients coming back) go in one call, one round trip and one commit, rather than one each. Each start is the start of
-- 20261204000002, called in turn, so each is answered as if alone, and a start sees those before it in the call (two
-- starts of one chat: the second finds the chat busy). A start asked to make its chat (dev mode, a chat nobody made)
-- makes it first, as the run's owner's, unless a chat has its id.
--
-- The starts are taken in the order of their chats' ids (then as given), so the chats they lock are always locked in
-- the same order: two calls on other connections, each holding the chats it started in until it commits, never wait
-- for each other in a circle. Each answer names its start by its place in `p_starts` (from 0).
--
-- A start the store refuses (a run id taken) fails the call, and nothing of it is kept; the caller then makes each
-- start alone. The single start stays for replicas of earlier versions during a rolling deploy.

CREATE OR REPLACE FUNCTION agent_start_runs(p_starts JSONB)
RETURNS TABLE (place INT, chat_found BOOLEAN, busy_run UUID, history JSONB)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s RECORD;
BEGIN
    FOR s IN
        SELECT (e.ordinality - 1)::INT AS at, (e.value->>'chat')::UUID AS chat, e.value AS v
        FROM jsonb_array_elements(p_starts) WITH ORDINALITY AS e
        ORDER BY 2, 1
    LOOP
        IF (s.v->>'make_chat')::BOOLEAN THEN
            INSERT INTO agent_chats (id, org_id, user_id, canvas_id, created_at, updated_at)
                VALUES (s.chat, s.v->>'org', s.v->>'user', s.v->>'canvas', now(), now())
                ON CONFLICT (id) DO NOTHING;
        END IF;
        RETURN QUERY SELECT s.at, r.found, r.busy_run, r.history FROM agent_start_run(
            (s.v->>'run')::UUID, s.chat, s.v->>'org', s.v->>'user', s.v->>'canvas', s.v->>'model', s.v->>'owner',
            s.v->>'prompt', s.v->'message', s.v->>'context', s.v->>'first_event') AS r;
    END LOOP;
END;
$$;
