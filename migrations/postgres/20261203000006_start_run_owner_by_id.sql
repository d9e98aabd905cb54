-- The owner check of 20261203000004 finds the chat by its id alone and compares the owner afterwards.
--
-- Its lookup named all four columns in one WHERE clause. PL/pgSQL switches a statement to a generic plan after a few
-- calls, and the generic plan for `id = $1 AND org_id = $2 AND user_id = $3 AND canvas_id = $4` may walk
-- agent_chats_owner_idx: every chat of that owner, thousands for a busy canvas, for each start. By the primary key it
-- is one row, whatever the plan.

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
BEGIN
    SELECT c.org_id, c.user_id, c.canvas_id INTO org, usr, canvas FROM agent_chats c WHERE c.id = p_chat FOR UPDATE;
    IF NOT FOUND OR org <> p_org OR usr <> p_user OR canvas <> p_canvas THEN
        RETURN QUERY SELECT FALSE, NULL::UUID, NULL::JSONB;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM agent_start_run(p_run, p_chat, p_model, p_owner, p_prompt, p_message, p_context,
        p_first_event);
END;
$$;
