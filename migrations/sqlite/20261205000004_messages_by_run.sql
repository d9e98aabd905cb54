-- Deleting a chat deletes its runs, and each run deleted deletes the messages that name it (`run_id`, ON DELETE
-- CASCADE), which without an index on `run_id` read the whole table of messages once per run.
CREATE INDEX IF NOT EXISTS agent_chat_messages_run_idx ON agent_chat_messages (run_id);
