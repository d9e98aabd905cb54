-- Takeover: the producer of a running run holds it under a lease with a fencing epoch. Claiming a run (a replica
-- continuing it after its producer is gone) raises the epoch; an append or an end written under an older epoch is
-- refused, so a stale producer that wakes up can add nothing. A released run (its replica drained in handoff mode)
-- has no owner: the first replica with a follower claims it.

ALTER TABLE agent_chat_runs ADD COLUMN epoch BIGINT NOT NULL DEFAULT 1;

-- What the client said about its context (`agent_context`, JSON): a continuation acts in the same context.
ALTER TABLE agent_chat_runs ADD COLUMN agent_context TEXT;
