"""The audit log: every request's record, durable before its answer, in a signed append-only tree.

    record.py    what a record holds, built from a request's events; its canonical bytes
    merkle.py    RFC 6962 hashing, inclusion and consistency proofs and their verifiers
    note.py      the Ed25519 log key and C2SP signed-note checkpoints
    store.py     the tables (SQLite; PostgreSQL in postgres.py), search included
    log.py       the writer: group commit from a bounded queue, tree nodes, checkpoints, retention
    verify.py    recompute everything from the database and name the first record that is wrong
"""
