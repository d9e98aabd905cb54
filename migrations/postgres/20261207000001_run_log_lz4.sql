-- Long run log rows are compressed with lz4 where the server has it (built `--with-lz4`, as the common packages are).
--
-- 20261204000001 stored every row as it is, since pglz, the default, held up each group commit behind the rows it was
-- compressing. An unpaced run's deltas committed together make a row of tens of KB, moved out of line uncompressed in
-- 2 KB pieces: a row in the table's out-of-line storage and an entry in its index for each piece, and the whole of it
-- in the write-ahead log. lz4 is several times faster than pglz, and a row's events repeat their JSON names line after
-- line: such a row shrinks to a fraction of its size, often small enough to stay in the table whole. Rows up to the
-- page's limit (`toast_tuple_target`, 8,160 bytes) are still stored as they are: only longer ones are compressed. The
-- benchmark's throughput on PostgreSQL (100 streams of 500 unpaced deltas each), runs taken in turn with the rows
-- uncompressed: medians 4 to 9% higher.
--
-- Without lz4 the rows stay uncompressed, as before. Rows already written keep the form they were written in; a
-- reader decompresses either, so replicas of earlier versions read the new rows as before.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        ALTER TABLE agent_run_events ALTER COLUMN events SET STORAGE EXTENDED;
        ALTER TABLE agent_run_events ALTER COLUMN events SET COMPRESSION lz4;
    END IF;
END;
$$;
