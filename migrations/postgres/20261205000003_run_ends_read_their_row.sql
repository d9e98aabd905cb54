-- A run's end reads its own row, however many runs are running. The end's statements are planned once per connection
-- for any parameters (`plan_cache_mode = force_generic_plan`), and a replica plans them as it starts, on a store that
-- may hold no running run at all (a new database, or every replica restarted). On such a table the plan chosen for
-- `WHERE id = p_run AND epoch = p_epoch AND status = 'running'` scanned `agent_chat_runs_chat_running_idx` (every
-- running run; its predicate is the statement's) and kept that plan: with 10,000 runs running, each end read all of
-- them (5,000 buffers an end with 10,000 running; 19,500 clients leaving at once, their runs' ends took 40 s, and 9 s
-- once each end read its own row). The status is compared with a variable here, so no plan can rely on that index and
-- the run is found by its key.

CREATE OR REPLACE FUNCTION agent_finish_run(
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
    running TEXT := 'running';
BEGIN
    UPDATE agent_chat_runs SET status = p_status, error = p_error, partial_output = p_output,
        input_tokens = p_input_tokens, output_tokens = p_output_tokens, total_tokens = p_total_tokens,
        finished_at = now()
        WHERE id = p_run AND epoch = p_epoch AND status = running
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
