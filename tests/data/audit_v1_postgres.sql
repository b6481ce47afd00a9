-- The audit tables on PostgreSQL as the release before schema versioning created them
-- (PostgresStore.create in server/nla_serve/audit/postgres.py at commit ea753a7), statement for statement.
-- tests/test_audit_store.py runs this on an empty database, then inserts the rows of audit_v1.sql, to get
-- a PostgreSQL log written by that release; opening it with the current code must migrate it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (seq BIGINT PRIMARY KEY, id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, model TEXT, key_id TEXT, entry BYTEA NOT NULL, sig BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS records_id ON records (id);
CREATE INDEX IF NOT EXISTS records_time ON records (time);
CREATE TABLE IF NOT EXISTS tree (level INTEGER NOT NULL, idx BIGINT NOT NULL, hash BYTEA NOT NULL, PRIMARY KEY (level, idx));
CREATE TABLE IF NOT EXISTS checkpoints (size BIGINT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS texts (id BIGSERIAL PRIMARY KEY, seq BIGINT NOT NULL, record_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, model TEXT, key_id TEXT, source TEXT NOT NULL, choice_index INTEGER, token_index INTEGER, token TEXT, status TEXT, fve DOUBLE PRECISION, grounding DOUBLE PRECISION, monitors TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS texts_seq ON texts (seq);
CREATE INDEX IF NOT EXISTS texts_time ON texts (time);
CREATE INDEX IF NOT EXISTS texts_record ON texts (record_id);
CREATE INDEX IF NOT EXISTS texts_trgm ON texts USING gin (text gin_trgm_ops);
