-- How far the run log's sweep has got: the events of the runs that finished up to `swept_to` (Unix milliseconds) are
-- gone. A sweep reads on from there (less an overlap), so what it reads follows the runs that finished since the last
-- one, not every run the store ever held.
CREATE TABLE agent_run_log_sweep (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    swept_to INTEGER NOT NULL
);

INSERT INTO agent_run_log_sweep (id, swept_to) VALUES (1, 0);
