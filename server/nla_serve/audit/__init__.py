"""The audit log: every request's record, durable before its answer, in a signed append-only tree.

    record.py    what a record holds (its own schema, ``v``), built from a request's events; its canonical bytes
    merkle.py    RFC 6962 hashing, inclusion and consistency proofs and their verifiers
    note.py      the Ed25519 log key and C2SP signed-note checkpoints
    store/       the tables: one schema with numbered migrations (schema.py), a backend-blind base,
                 SQLite and PostgreSQL, and the one search function the CLI and HTTP share (search.py)
    log.py       the writer: group commit from a bounded queue, tree nodes, checkpoints, retention
    verify.py    recompute everything from the database and name the first record that is wrong
"""
