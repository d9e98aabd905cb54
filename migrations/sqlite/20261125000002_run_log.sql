-- The run log: every event of a run, in order, written before any client receives it. A row holds one or more
-- consecutive events of one run (seq to last_seq) as a JSON array of their JSON, so a group commit writes one row per
-- run per batch.

CREATE TABLE agent_run_events (
    run_id   TEXT NOT NULL REFERENCES agent_chat_runs (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    events   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

-- When a process other than the producer last had a client following the run (Unix milliseconds).
ALTER TABLE agent_chat_runs ADD COLUMN followed_at INTEGER;

CREATE INDEX agent_chat_runs_finished_idx ON agent_chat_runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX agent_chat_runs_chat_running_idx ON agent_chat_runs (chat_id) WHERE status = 'running';
