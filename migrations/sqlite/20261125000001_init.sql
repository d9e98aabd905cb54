-- Chats, their messages and their runs. Ids are UUID text; times are Unix milliseconds (UTC).

CREATE TABLE agent_chats (
    id                  TEXT PRIMARY KEY NOT NULL,
    org_id              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    canvas_id           TEXT NOT NULL,
    initial_message     TEXT,
    total_input_tokens  INTEGER NOT NULL DEFAULT 0,
    total_output_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens        INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

CREATE INDEX agent_chats_owner_idx ON agent_chats (org_id, user_id, canvas_id, created_at DESC);

CREATE TABLE agent_chat_runs (
    id             TEXT PRIMARY KEY NOT NULL,
    chat_id        TEXT NOT NULL REFERENCES agent_chats (id) ON DELETE CASCADE,
    model          TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    error          TEXT,
    input_tokens   INTEGER NOT NULL DEFAULT 0,
    output_tokens  INTEGER NOT NULL DEFAULT 0,
    total_tokens   INTEGER NOT NULL DEFAULT 0,
    partial_output TEXT NOT NULL DEFAULT '',
    owner_instance TEXT NOT NULL,
    heartbeat_at   INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    finished_at    INTEGER
);

CREATE INDEX agent_chat_runs_chat_idx ON agent_chat_runs (chat_id, created_at);
CREATE INDEX agent_chat_runs_running_idx ON agent_chat_runs (heartbeat_at) WHERE status = 'running';

CREATE TABLE agent_chat_messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id       TEXT NOT NULL REFERENCES agent_chats (id) ON DELETE CASCADE,
    message_index INTEGER NOT NULL,
    message       TEXT NOT NULL,
    run_id        TEXT REFERENCES agent_chat_runs (id) ON DELETE CASCADE,
    created_at    INTEGER NOT NULL,
    UNIQUE (chat_id, message_index)
);
