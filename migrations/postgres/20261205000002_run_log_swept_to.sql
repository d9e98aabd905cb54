-- How far the run log's sweep has got: the events of the runs that finished up to `swept_to` are gone. A sweep reads
-- on from there (less an overlap), so what it reads follows the runs that finished since the last one, not every run
-- the store ever held.
CREATE TABLE agent_run_log_sweep (
    id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    swept_to TIMESTAMPTZ NOT NULL
);

INSERT INTO agent_run_log_sweep (swept_to) VALUES ('-infinity');
