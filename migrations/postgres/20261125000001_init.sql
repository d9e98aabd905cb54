-- Chats, their messages and their runs.

CREATE TABLE agent_chats (
    id                  UUID PRIMARY KEY,
    org_id              TEXT NOT NULL,
    user_id             TEXT NOT NULL,
    canvas_id           TEXT NOT NULL,
    initial_message     TEXT,
    total_input_tokens  BIGINT NOT NULL DEFAULT 0,
    total_output_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens        BIGINT NOT NULL DEFAULT 0,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX agent_chats_owner_idx ON agent_chats (org_id, user_id, canvas_id, created_at DESC);

CREATE TABLE agent_chat_runs (
    id             UUID PRIMARY KEY,
    chat_id        UUID NOT NULL REFERENCES agent_chats (id) ON DELETE CASCADE,
    model          TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
    error          TEXT,
    input_tokens   BIGINT NOT NULL DEFAULT 0,
    output_tokens  BIGINT NOT NULL DEFAULT 0,
    total_tokens   BIGINT NOT NULL DEFAULT 0,
    partial_output TEXT NOT NULL DEFAULT '',
    owner_instance TEXT NOT NULL,
    heartbeat_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at    TIMESTAMPTZ
);

CREATE INDEX agent_chat_runs_chat_idx ON agent_chat_runs (chat_id, created_at);
CREATE INDEX agent_chat_runs_running_idx ON agent_chat_runs (heartbeat_at) WHERE status = 'running';

CREATE TABLE agent_chat_messages (
    id            BIGSERIAL PRIMARY KEY,
    chat_id       UUID NOT NULL REFERENCES agent_chats (id) ON DELETE CASCADE,
    message_index INTEGER NOT NULL,
    message       JSONB NOT NULL,
    run_id        UUID REFERENCES agent_chat_runs (id) ON DELETE CASCADE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (chat_id, message_index)
);
