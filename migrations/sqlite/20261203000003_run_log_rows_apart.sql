-- The run log's rows move out of its key. In a WITHOUT ROWID table each row lives inside the primary key's b-tree;
-- a row of a group commit holds a batch of events, often more than the ~1 KB a key entry keeps on its page, and every
-- search of the key that compares against such an entry read all of its overflow pages (a fifth of a busy writer's
-- time). As an ordinary table the rows are appended in commit order and the key (run_id, seq) is a small index.

CREATE TABLE agent_run_events_rows (
    run_id   TEXT NOT NULL REFERENCES agent_chat_runs (id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    events   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

INSERT INTO agent_run_events_rows (run_id, seq, last_seq, events)
    SELECT run_id, seq, last_seq, events FROM agent_run_events;

DROP TABLE agent_run_events;

ALTER TABLE agent_run_events_rows RENAME TO agent_run_events;
