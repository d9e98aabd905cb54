-- A run start in one function body, with no statement done twice: the owner-checking start of 20261203000006 locked
-- the chat, then called the start of 20261203000001, which locked the same row again, read the chat's messages for the
-- history and then once more for the next message index. Each statement of a PL/pgSQL function is an executor started
-- and ended; the start is the busiest call on the store when many runs begin at once (8 clients on this project's
-- 2-core benchmark box: about 4,700 starts per second before, 5,700 after).
--
-- Same arguments, result and locking as before: the chat row is locked first, and every other writer of a chat's
-- messages holds that lock too, so the index read with the history is still the next one when the prompt is stored.
-- The eight-argument start stays for replicas of earlier versions during a rolling deploy.

CREATE OR REPLACE FUNCTION agent_start_run(
    p_run UUID,
    p_chat UUID,
    p_org TEXT,
    p_user TEXT,
    p_canvas TEXT,
    p_model TEXT,
    p_owner TEXT,
    p_prompt TEXT,
    p_message JSONB,
    p_context TEXT,
    p_first_event TEXT
) RETURNS TABLE (found BOOLEAN, busy_run UUID, history JSONB)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    org TEXT;
    usr TEXT;
    canvas TEXT;
    going UUID;
    earlier JSONB;
    next_index INT;
BEGIN
    SELECT c.org_id, c.user_id, c.canvas_id INTO org, usr, canvas FROM agent_chats c WHERE c.id = p_chat FOR UPDATE;
    IF NOT FOUND OR org <> p_org OR usr <> p_user OR canvas <> p_canvas THEN
        RETURN QUERY SELECT FALSE, NULL::UUID, NULL::JSONB;
        RETURN;
    END IF;
    SELECT r.id INTO going FROM agent_chat_runs r WHERE r.chat_id = p_chat AND r.status = 'running' LIMIT 1;
    IF going IS NOT NULL THEN
        RETURN QUERY SELECT TRUE, going, NULL::JSONB;
        RETURN;
    END IF;
    SELECT COALESCE(jsonb_agg(m.message ORDER BY m.message_index), '[]'::JSONB), COALESCE(MAX(m.message_index) + 1, 0)
        INTO earlier, next_index FROM agent_chat_messages m WHERE m.chat_id = p_chat;
    UPDATE agent_chats SET updated_at = now(), initial_message = COALESCE(initial_message, p_prompt)
        WHERE id = p_chat;
    INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, agent_context, heartbeat_at, created_at)
        VALUES (p_run, p_chat, p_model, 'running', p_owner, p_context, now(), now());
    INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at)
        VALUES (p_chat, next_index, p_message, p_run, now());
    IF p_first_event IS NOT NULL THEN
        INSERT INTO agent_run_events (run_id, seq, last_seq, events) VALUES (p_run, 1, 1, p_first_event);
    END IF;
    RETURN QUERY SELECT TRUE, NULL::UUID, earlier;
END;
$$;
