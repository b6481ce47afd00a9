"""The audit log's writer: one thread, a bounded queue, group commit.

Requests hand their finished record to ``append`` (awaited) and go on only when the batch holding
it is committed: ``synchronous=FULL`` on SQLite, a committed transaction on PostgreSQL. The writer
takes everything queued while the previous commit ran as the next batch, so commits amortise
under load instead of serialising requests. In each batch it assigns leaf indices, signs each
record's statement, stores the tree nodes the batch completed, and signs a checkpoint when
``checkpoint_every`` records or ``checkpoint_seconds`` have passed since the last one (and on
start when a crash left signed records past the last checkpoint, and on close).

Retention runs through the same queue: whole records older than the cutoff are deleted, their
leaf hashes stay in the tree (so old checkpoints and proofs still verify), and a ``retention``
record saying what was deleted is appended in the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nla_serve.audit import merkle
from nla_serve.audit.note import Checkpoint, LogKey, record_statement
from nla_serve.audit.record import VERSION, canonical, iso, texts_of
from nla_serve.audit.store import Batch, RecordRow, Store
from nla_serve.errors import UnavailableError

log = logging.getLogger("nla_serve.audit")


class AuditError(UnavailableError):
    """The record could not be made durable, so the answer is not given (503)."""


@dataclass
class _Item:
    record: dict | None  # None: a control item (checkpoint now, prune, stop)
    done: "asyncio.Future | None" = None
    loop: "asyncio.AbstractEventLoop | None" = None
    prune_before: float | None = None
    force_checkpoint: bool = False
    stop: bool = False
    enqueued: float = field(default_factory=time.monotonic)


class AuditLog:
    def __init__(self, store: Store, key: LogKey, *, queue_size: int = 4096, max_batch: int = 512,
                 checkpoint_every: int = 256, checkpoint_seconds: float = 10.0, retention_days: float | None = None,
                 checkpoint_file: Path | None = None, append_timeout: float = 30.0, metrics=None):
        self.store = store
        self.key = key
        self.origin = key.origin
        self.queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.retention_days = retention_days
        self.checkpoint_file = checkpoint_file
        self.append_timeout = append_timeout
        self.metrics = metrics
        self.frontier = merkle.Frontier()
        self.signed_size = 0  # the latest checkpoint's size
        self.signed_at = time.monotonic()
        self.latest_note: str | None = None
        self.failure: str | None = None  # the last commit error, for /health and the log
        self._thread: threading.Thread | None = None
        self._node_cache: dict[tuple[int, int], bytes] = {}
        self._last_prune = 0.0

    # -- life ---------------------------------------------------------------------------------
    def open(self) -> "AuditLog":
        stored = self.store.set_meta_once("origin", self.origin)
        if stored != self.origin:
            raise AuditError(f"the audit database belongs to log {stored!r}, but the key signs for {self.origin!r}: "
                             "use that log's key (--audit-key) or another database")
        self.store.set_meta_once("verifier_key", str(self.key.verifier))
        size = self.store.size_unlocked()
        self.frontier = merkle.Frontier.load(size, self.store.node)
        latest = self.store.latest_checkpoint()
        self.signed_size = latest[0] if latest else 0
        self.latest_note = latest[2] if latest else None
        self._check_tail()
        self._thread = threading.Thread(target=self._run, name="nla-audit-writer", daemon=True)
        self._thread.start()
        if size > self.signed_size:  # a crash left records past the last checkpoint: sign them now
            self.request_checkpoint()
        log.info("audit log %s: %d records; checkpoints signed by %s", self.origin, size, self.key.verifier)
        return self

    def _check_tail(self) -> None:
        """Refuse to extend a log whose unsigned tail was tampered with while the server was down."""
        from nla_serve.audit.verify import check_record

        for seq in range(self.signed_size, self.frontier.size):
            row = self.store.record_at(seq)
            if row is None:
                continue  # pruned, or deleted: `nla-serve audit verify` says which
            problem = check_record(row, self.key.verifier, self.store.node(0, seq))
            if problem:
                raise AuditError(f"the audit log is damaged: {problem}; run `nla-serve audit verify` before "
                                 "serving with it")

    def close(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self.queue.put(_Item(None, force_checkpoint=True, stop=True))
        self._thread.join(timeout)
        self._thread = None
        self.store.close()

    # -- appending ----------------------------------------------------------------------------
    async def append(self, record: dict) -> int:
        """Queue ``record`` and wait until it is durable; its leaf index. AuditError if it cannot be."""
        loop = asyncio.get_running_loop()
        item = _Item(record, loop.create_future(), loop)
        await self._put(item)
        try:
            return await asyncio.wait_for(asyncio.shield(item.done), self.append_timeout)
        except asyncio.TimeoutError:
            raise AuditError(f"the audit log did not record this answer within {self.append_timeout:g} s "
                             f"({self.failure or 'the writer is behind'}); it is not given") from None

    def append_nowait(self, record: dict) -> None:
        """Queue ``record`` without waiting (an aborted request: nobody waits for its answer)."""
        try:
            self.queue.put_nowait(_Item(record))
        except queue.Full:
            threading.Thread(target=self.queue.put, args=(_Item(record),), daemon=True).start()

    async def _put(self, item: _Item) -> None:
        if self._thread is None:
            raise AuditError("the audit log is closed")
        try:
            self.queue.put_nowait(item)
        except queue.Full:  # backpressure: wait for room off the event loop, never drop a record
            await asyncio.to_thread(self.queue.put, item, True, self.append_timeout)

    def request_checkpoint(self) -> None:
        self.queue.put(_Item(None, force_checkpoint=True))

    async def checkpoint_now(self) -> None:
        """Sign a checkpoint covering every record committed so far (proofs for fresh records)."""
        loop = asyncio.get_running_loop()
        item = _Item(None, loop.create_future(), loop, force_checkpoint=True)
        await self._put(item)
        await asyncio.wait_for(asyncio.shield(item.done), self.append_timeout)

    def prune(self, before: float) -> None:
        self.queue.put(_Item(None, prune_before=before))

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            wait = max(0.05, self.checkpoint_seconds - (time.monotonic() - self.signed_at))
            try:
                items = [self.queue.get(timeout=wait)]
            except queue.Empty:
                items = []
            while len(items) < self.max_batch:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(i.stop for i in items)
            if self.retention_days is not None and time.time() - self._last_prune > 3600:
                self._last_prune = time.time()
                items.append(_Item(None, prune_before=time.time() - self.retention_days * 86400))
            due = (self.frontier.size > self.signed_size
                   and time.monotonic() - self.signed_at >= self.checkpoint_seconds)
            if not items and not due:
                continue
            try:
                self._commit(items, force_checkpoint=due)
            except Exception as e:  # a bug past the commit's own handling: never let the writer die
                log.exception("the audit writer failed on a batch of %d item(s)", len(items))
                self.failure = f"{type(e).__name__}: {e}"
                for item in items:  # futures already settled stay as they are
                    self._resolve(item, error=AuditError(f"the audit writer failed ({self.failure}); the answer "
                                                         "is not given"))
            self._observe("set_audit_queue", self.queue.qsize())

    def _observe(self, name: str, *args) -> None:
        """Feed a metric; a metrics failure is logged, never allowed to stop the writer."""
        if self.metrics is None:
            return
        try:
            getattr(self.metrics, name)(*args)
        except Exception:
            log.exception("audit metric %s failed", name)

    def _commit(self, items: list[_Item], force_checkpoint: bool = False) -> None:
        started = time.monotonic()
        store = self.store
        records = [i for i in items if i.record is not None]
        try:
            size = store.begin_append()
            if size != self.frontier.size:  # another replica appended since our last batch
                self.frontier = merkle.Frontier.load(size, store.node)
            batch = Batch([], [], [])
            for item in items:
                if item.prune_before is not None:
                    self._prune_into(batch, item.prune_before)
            seqs = [self._add(batch, item.record) for item in records]
            sign = (force_checkpoint or any(i.force_checkpoint for i in items)
                    or self.frontier.size - self.signed_size >= self.checkpoint_every)
            note = None
            if sign and (self.frontier.size != self.signed_size or self.latest_note is None):
                cp = Checkpoint(self.origin, self.frontier.size, self.frontier.root())
                note = cp.sign(self.key)
                batch.checkpoint = (cp.size, time.time(), note)
            store.write(batch)
            store.commit()
        except Exception as e:
            try:
                store.rollback()
            except Exception:
                pass
            self.frontier = merkle.Frontier.load(store.size_unlocked(), store.node) if _alive(store) else self.frontier
            self.failure = f"{type(e).__name__}: {e}"
            log.error("audit commit of %d record(s) failed: %s", len(records), self.failure)
            self._observe("record_audit_failure")
            for item in items:
                self._resolve(item, error=AuditError(f"the audit log could not record this answer ({self.failure}); "
                                                     "it is not given"))
            return
        self.failure = None
        if sign:
            self.signed_at = time.monotonic()
        if note is not None:
            self.signed_size, self.latest_note = self.frontier.size, note
            self._write_checkpoint_file(note)
        for item, seq in zip(records, seqs):
            self._resolve(item, result=seq)
        for item in items:
            if item.record is None:
                self._resolve(item, result=None)
        self._observe("record_audit_commit", len(records), time.monotonic() - started,
                      [r.record["status"] for r in records])

    def _add(self, batch: Batch, record: dict) -> int:
        seq = self.frontier.size
        now = time.time()
        record = dict(record, seq=seq, time=iso(now))
        entry = canonical(record)
        leaf = merkle.leaf_hash(entry)
        sig = self.key.sign(record_statement(self.origin, seq, leaf))
        batch.nodes.extend(self.frontier.append(leaf))
        batch.records.append(RecordRow(seq, record["id"], now, record["kind"], record["status"], record.get("model"),
                                       record.get("key_id"), entry, sig))
        batch.texts.extend(texts_of(record, seq, now))
        return seq

    def _prune_into(self, batch: Batch, before: float) -> None:
        through = self.store.last_seq_before(before)
        if through is None:
            return
        count = self.store.rows("SELECT COUNT(*) FROM records WHERE seq <= ? AND kind != 'retention'",
                                (through,))[0][0]
        if not count:
            return
        batch.prune_through = through
        self._add(batch, {"v": VERSION, "id": "retention-" + uuid.uuid4().hex, "kind": "retention",
                          "status": "completed", "created": iso(time.time()), "model": None, "key_id": None,
                          "pruned": {"through_seq": through, "before": iso(before), "count": int(count)}})
        log.info("audit retention: deleted %d record(s) up to #%d (older than %s); their leaf hashes stay",
                 count, through, iso(before))

    def _resolve(self, item: _Item, result=None, error: Exception | None = None) -> None:
        if item.done is None:
            return

        def settle():
            if not item.done.done():
                item.done.set_exception(error) if error is not None else item.done.set_result(result)

        try:
            item.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # that event loop is closed: nobody is waiting any more
            pass

    def _write_checkpoint_file(self, note: str) -> None:
        """The latest checkpoint, also outside the database: restoring an old copy of the database
        (a rollback) is then caught by ``verify`` with no extra step."""
        if self.checkpoint_file is None:
            return
        try:
            self.checkpoint_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_file.with_suffix(".tmp")
            tmp.write_text(note, encoding="utf-8")
            os.replace(tmp, self.checkpoint_file)
        except OSError as e:
            log.warning("could not write %s: %s", self.checkpoint_file, e)

    # -- proofs -------------------------------------------------------------------------------
    def node(self, level: int, idx: int) -> bytes:
        """Tree nodes never change once written: cached (bounded) for proofs."""
        got = self._node_cache.get((level, idx))
        if got is None:
            got = self.store.node(level, idx)
            if len(self._node_cache) > 200_000:
                self._node_cache.clear()
            self._node_cache[level, idx] = got
        return got

    def latest(self) -> tuple[int, str] | None:
        row = self.store.latest_checkpoint()
        return (row[0], row[2]) if row else None


def _alive(store: Store) -> bool:
    try:
        store.size_unlocked()
        return True
    except Exception:
        return False
