-- A run's end in one round trip: what `finish_run` does in a transaction on SQLite, as one call (one transaction).
--
-- Ends the run if it is still running under `p_epoch` (`found = false` otherwise: it was claimed by another replica or
-- has already ended, and nothing is written), adds its usage to the chat's totals, and appends its messages (a JSON
-- array, in order) after the chat's last one.

CREATE FUNCTION agent_finish_run(
    p_run UUID,
    p_epoch BIGINT,
    p_status TEXT,
    p_error TEXT,
    p_output TEXT,
    p_input_tokens BIGINT,
    p_output_tokens BIGINT,
    p_total_tokens BIGINT,
    p_messages JSONB
) RETURNS BOOLEAN
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    chat UUID;
BEGIN
    UPDATE agent_chat_runs SET status = p_status, error = p_error, partial_output = p_output,
        input_tokens = p_input_tokens, output_tokens = p_output_tokens, total_tokens = p_total_tokens,
        finished_at = now()
        WHERE id = p_run AND epoch = p_epoch AND status = 'running'
        RETURNING chat_id INTO chat;
    IF chat IS NULL THEN
        RETURN FALSE;
    END IF;
    UPDATE agent_chats SET updated_at = now(), total_input_tokens = total_input_tokens + p_input_tokens,
        total_output_tokens = total_output_tokens + p_output_tokens, total_tokens = total_tokens + p_total_tokens
        WHERE id = chat;
    INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id, created_at)
        SELECT chat, last.next + m.n - 1, m.message, p_run, now()
        FROM jsonb_array_elements(p_messages) WITH ORDINALITY AS m (message, n),
            (SELECT COALESCE(MAX(message_index) + 1, 0) AS next FROM agent_chat_messages WHERE chat_id = chat) last;
    RETURN TRUE;
END;
$$;
