-- A run start in one round trip: what `start_run` does in a transaction on SQLite, as one call. Each statement of a
-- volatile function sees what was committed before it (as the statements of a READ COMMITTED transaction do), and the
-- call is one transaction: nothing is written unless the run starts.
--
-- Locks the chat row (so two starts of one chat cannot both see it idle and no two runs take the same message index),
-- then: a missing chat answers `found = false`; a chat with a run going answers that run in `busy_run`; otherwise the
-- run row, the prompt as the chat's next message (and `initial_message` from a first prompt) and the run's first event
-- are stored, and `history` is the chat's messages before the prompt, in order, as a JSON array.

CREATE FUNCTION agent_start_run(
    p_run UUID,
    p_chat UUID,
    p_model TEXT,
    p_owner TEXT,
    p_prompt TEXT,
    p_message JSONB,
    p_context TEXT,
    p_first_event TEXT
) RETURNS TABLE (found BOOLEAN, busy_run UUID, history JSONB)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    going UUID;
    earlier JSONB;
BEGIN
    PERFORM 1 FROM agent_chats WHERE id = p_chat FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT FALSE, NULL::UUID, NULL::JSONB;
        RETURN;
    END IF;
    SELECT r.id INTO going FROM agent_chat_runs r WHERE r.chat_id = p_chat AND r.status = 'running' LIMIT 1;
    IF going IS NOT NULL THEN
        RETURN QUERY SELECT TRUE, going, NULL::JSONB;
        RETURN;
    END IF;
    SELECT COALESCE(jsonb_agg(m.message ORDER BY m.message_index), '[]'::JSONB) INTO earlier
        FROM agent_chat_messages m WHERE m.chat_id = p_chat;
    UPDATE agent_chats SET updated_at = now(), initial_message = COALESCE(initial_message, p_prompt)
        WHERE id = p_chat;
    INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, agent_context, heartbeat_at, created_at)
        VALUES (p_run, p_chat, p_model, 'running', p_owner, p_context, now(), now());
    INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at)
        SELECT p_chat, COALESCE(MAX(m.message_index) + 1, 0), p_message, p_run, now()
        FROM agent_chat_messages m WHERE m.chat_id = p_chat;
    IF p_first_event IS NOT NULL THEN
        INSERT INTO agent_run_events (run_id, seq, last_seq, events) VALUES (p_run, 1, 1, p_first_event);
    END IF;
    RETURN QUERY SELECT TRUE, NULL::UUID, earlier;
END;
$$;
