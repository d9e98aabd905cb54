-- A run's heartbeat is refreshed in place. Every replica refreshes `heartbeat_at` of each run it drives three times per
-- lease; with the column indexed, each refresh wrote a new version of the row and an entry in each of the table's five
-- indexes, about 25 µs of the server's time per run (a round for 20,000 running runs: 435–525 ms median, every 10 s,
-- on this project's 2-core benchmark box; `bench/heartbeats`). Without an index on the column, and with room left in
-- each page for the new version, half the refreshes touch no index: 242–259 ms a round.
--
-- The index served one statement: marking `interrupted` the running runs whose heartbeat is stale, once per third of
-- a lease per replica. It reads the running runs through `agent_chat_runs_chat_running_idx` instead: 25–28 ms for
-- 20,000 running runs, against 0.1 ms.

DROP INDEX agent_chat_runs_running_idx;
ALTER TABLE agent_chat_runs SET (fillfactor = 90);
