-- Long values are written without pglz, PostgreSQL's default compression: it took most of the time of the writes at a
-- run's end, when many runs ended at once.
--
-- The run log's rows are stored as they are. A row over about 2 KB (a run's final answer, or many deltas of an unpaced
-- run committed together) was compressed on its way in by the one connection that does every group commit, and every
-- run's events waited behind it. The rows are short-lived (swept after RUN_LOG_RETENTION), so their size matters less
-- than the time to write them: a row up to the page's limit stays in the table uncompressed, and a longer one is moved
-- out of line, uncompressed too.
--
-- A run's answer (its partial output, and its messages) stays compressed, with lz4 where the server has it (built
-- `--with-lz4`, as the common packages are): several times faster than pglz, at a similar size for text.

ALTER TABLE agent_run_events ALTER COLUMN events SET STORAGE EXTERNAL;
ALTER TABLE agent_run_events SET (toast_tuple_target = 8160);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE agent_chat_runs ALTER COLUMN partial_output SET COMPRESSION lz4;
        ALTER TABLE agent_chat_messages ALTER COLUMN message SET COMPRESSION lz4;
    END IF;
END;
$$;
