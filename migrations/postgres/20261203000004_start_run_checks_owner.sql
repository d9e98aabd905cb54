-- A run start that also checks whose chat it is, so a request whose token names the chat's owner starts its run in
-- one round trip (without looking the chat up first). A chat of another owner answers `found = false`, as a missing
-- one does, before anything about its runs is read.
--
-- An overload beside the eight-argument function of 20261203000001, which replicas of the previous version go on
-- calling during a rolling deploy.

CREATE FUNCTION agent_start_run(
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
BEGIN
    PERFORM 1 FROM agent_chats
        WHERE id = p_chat AND org_id = p_org AND user_id = p_user AND canvas_id = p_canvas FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT FALSE, NULL::UUID, NULL::JSONB;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM agent_start_run(p_run, p_chat, p_model, p_owner, p_prompt, p_message, p_context,
        p_first_event);
END;
$$;
