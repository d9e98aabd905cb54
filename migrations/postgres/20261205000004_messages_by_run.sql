-- no-transaction
-- Deleting a chat deletes its runs, and each run deleted deletes the messages that name it (`run_id`, ON DELETE
-- CASCADE), which without an index on `run_id` read the whole table of messages once per run. Built without blocking
-- the writes of the replicas serving meanwhile; an index left invalid by a build that failed is kept (the deletes read
-- the table as before) rather than failing every later start.
CREATE INDEX CONCURRENTLY IF NOT EXISTS agent_chat_messages_run_idx ON agent_chat_messages (run_id);
