"""The API process's end of the capture directory: read each step's file once, hand its rows to the
choices they belong to, delete the file.

It owns the rows between the step file and the choice: reading a file once for every choice in it
is what keeps one read per engine step however many requests capture. It shares only the protocol
(``protocol``) with the engine processes' end (``connector``) and never imports it. See
``protocol`` for how rows get there and how files are named.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from nla_serve.engines.vllm.capture.protocol import ERROR_SUFFIX, STEP_SUFFIX, CaptureError, choice_of, remove_file

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class _Arrived:
    """Rows of one choice read from step files and not yet taken."""

    pieces: list[tuple[int, "torch.Tensor", list[int]]] = field(default_factory=list)  # (start, rows, tokens)
    final: bool = False  # its last piece came: nothing more will
    error: str | None = None
    since: float = field(default_factory=time.monotonic)

    @property
    def storages(self) -> dict[int, int]:
        """The buffers its rows are views of: {address: bytes} (a step file's whole buffer each)."""
        return {rows.untyped_storage().data_ptr(): rows.untyped_storage().nbytes()
                for _, rows, _ in self.pieces}


@dataclass
class CaptureDir:
    """The API process's end of one engine's capture directory.

    The engine writes one file per step for all capturing requests in it (one write and one read
    per step, not one per request and step).
    Whoever asks first reads every step file that is there, in order, and keeps the rows by choice
    until that choice takes them, so each file is read exactly once.

    Example::

        cap = CaptureDir(make_capture_dir("target"))
        rows = cap.take_rows(key, index=0, start=0, token_ids=ids)        # while it runs
        rows = await cap.finish(key, 0, num_rows=P + G - 1, start=taken)  # at its end
        cap.close()
    """

    path: str
    poll_s: tuple[float, float] = (0.0005, 0.005)  # first and longest wait between directory scans
    discard_after_s: float = 120.0
    _arrived: dict[tuple[str, int], _Arrived] = field(default_factory=dict)
    _graveyard: dict[str, list] = field(default_factory=dict)  # key -> [forget after (monotonic), choices left]

    # -- reading step files --------------------------------------------------------------------

    def ingest(self) -> None:
        """Read every complete step file (and error note) in step order, file its rows under their
        choices, delete it. Files being written have a hidden temporary name and are skipped."""
        try:
            names = sorted(nm for nm in os.listdir(self.path) if not nm.startswith("."))
        except FileNotFoundError:
            return
        for name in names:
            full = os.path.join(self.path, name)
            try:
                if name.endswith(STEP_SUFFIX):
                    self._file_step(full)
                elif name.endswith(ERROR_SUFFIX):
                    self._file_error(full)
            except Exception:  # files are renamed into place whole, so only tampering gets here:
                # its choices time out with a clear error rather than every reader failing on it
                logger.exception("unreadable capture file %s dropped", full)
            finally:
                remove_file(full)

    def _file_step(self, full: str) -> None:
        from safetensors.torch import load

        with open(full, "rb") as f:  # read whole and parsed from memory: faster than safe_open (docs/benchmarks.md)
            data = f.read()
        # the safetensors layout: an 8-byte little-endian header size, then the JSON header
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        ids = json.loads(header["__metadata__"]["ids"])
        tensors = load(data)
        index = tensors["pieces"].tolist()  # [(start, rows, final)] per request, in row order
        tokens = tensors["token_ids"].tolist()
        # views into the step's one buffer, split in one call: the buffer lives until its last
        # piece is taken (copied out) or dropped (``collect_garbage``, which counts whole buffers)
        parts = tensors["hidden_states"].split([count for _, count, _ in index])
        at = 0
        for internal_id, (start, count, final), rows in zip(ids, index, parts):
            got = self._receive(internal_id, bool(final))
            if got is not None and count:
                got.pieces.append((start, rows, tokens[at:at + count]))
            at += count

    def _file_error(self, full: str) -> None:
        with open(full) as f:
            note = json.load(f)
        for internal_id, final in zip(note["ids"], note["finals"]):
            got = self._receive(internal_id, final)
            if got is not None:
                got.error = note["error"]

    def _receive(self, internal_id: str, final: bool) -> _Arrived | None:
        """Where a request's rows go (None: a discarded choice's, dropped)."""
        key, index = choice_of(internal_id)
        entry = self._graveyard.get(key)
        if entry is not None:
            self._arrived.pop((key, index), None)
            if final:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._graveyard[key]
            return None
        got = self._arrived.setdefault((key, index), _Arrived())
        got.final = got.final or final
        return got

    # -- handing rows to a choice --------------------------------------------------------------

    def take_rows(self, key: str, index: int, start: int,
                  token_ids: list[int] | None = None) -> "torch.Tensor | None":
        """The rows of a choice that have arrived since the last call, which handed on rows up to
        ``start``: one float32 tensor of its own (None if none arrived). ``token_ids`` are the
        tokens the choice has so far: rows are handed on only up to them (the last has no row yet)
        and checked against them; rows past them stay until the choice has those tokens (the
        engine may be a step ahead, and past a stop string they are never handed on: ``finish``
        drops them)."""
        got = self._arrived.get((key, index))
        if got is None or not got.pieces:
            # Only a choice with no rows waiting looks for new files: the first choice updated after
            # an engine step reads that step's file for all of them (one directory scan per step,
            # not one per choice); rows of a file that lands meanwhile go with the next update.
            self.ingest()
            got = self._arrived.get((key, index))
        if got is None:
            return None
        if got.error is not None:
            self._arrived.pop((key, index))
            raise CaptureError(f"the capture connector failed: {got.error}")
        limit = len(token_ids) - 1 if token_ids is not None else None
        views, kept, at = [], [], start
        for first, rows, saved in got.pieces:
            if kept:  # an earlier piece reached the limit: this one waits too
                kept.append((first, rows, saved))
                continue
            if first != at:
                raise CaptureError(f"choice {index} of {key}: rows from {first} arrived, {at} expected")
            count = len(saved) if limit is None else max(0, min(len(saved), limit - first))
            if token_ids is not None and saved[:count] != token_ids[first:first + count]:
                raise CaptureError(f"choice {index} of {key}: captured rows belong to other tokens than this choice's")
            if count:
                views.append(rows if count == len(saved) else rows[:count])
                at += count
            if count < len(saved):
                kept.append((first + count, rows[count:], saved[count:]))
        got.pieces = kept
        if not kept and not got.final:
            del self._arrived[(key, index)]  # until more arrive (so ``since`` dates untaken rows only)
        return _owned_float(views)

    async def finish(self, key: str, index: int, num_rows: int, token_ids: list[int] | None = None, *,
                     start: int = 0, alive: Callable[[], bool] = lambda: True, timeout_s: float = 60.0
                     ) -> "torch.Tensor | None":
        """Rows ``start .. num_rows-1`` of a finished choice (None if there are none), once its last
        piece has arrived (the engine may run a step past the end before the abort of a stop string
        reaches it). Rows past ``num_rows`` belong to tokens a stop string removed and are dropped."""
        await self._until_final(key, index, alive, timeout_s)
        try:
            rows = self.take_rows(key, index, start, token_ids)
        finally:
            self._arrived.pop((key, index), None)
        got = start + (rows.shape[0] if rows is not None else 0)
        if got < num_rows:
            raise CaptureError(f"choice {index} of {key}: rows {start}..{got - 1} captured, "
                               f"{start}..{num_rows - 1} expected")
        return rows[:num_rows - start] if rows is not None and num_rows > start else None

    async def _until_final(self, key: str, index: int, alive: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        delay = self.poll_s[0]
        while True:
            self.ingest()
            got = self._arrived.get((key, index))
            if got is not None and got.final:
                return
            if not alive():
                raise CaptureError("the engine stopped before delivering the captured rows")
            if time.monotonic() > deadline:
                raise CaptureError(f"no captured rows for {key} choice {index} after {timeout_s:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_s[1])

    # -- forgetting ------------------------------------------------------------------------------

    def discard(self, key: str, choices: int = 1) -> None:
        """Drop ``key``'s rows now and as they arrive later (``choices``: how many of its choices'
        last pieces are still to come, one per aborted choice). The key is forgotten once those
        have come, or after ``discard_after_s`` (a choice aborted before it computed anything never
        sends one)."""
        for k in [k for k in self._arrived if k[0] == key]:
            got = self._arrived.pop(k)
            if got.final:
                choices -= 1
        if choices > 0:
            self._graveyard[key] = [time.monotonic() + self.discard_after_s, choices]
        self.sweep()

    def sweep(self) -> None:
        """Read what has arrived (dropping discarded keys' rows); forget keys that are done."""
        now = time.monotonic()
        for key, (until, _) in list(self._graveyard.items()):
            if until < now:
                del self._graveyard[key]
        self.ingest()

    def collect_garbage(self, max_age_s: float, max_bytes: int) -> int:
        """Drop what nobody will take, and return the bytes left: rows that arrived more than
        ``max_age_s`` ago (a choice whose reader is gone), then the oldest while more than
        ``max_bytes`` are held; half-written temporaries older than ``max_age_s`` too."""
        now = time.time()
        try:
            for name in os.listdir(self.path):
                full = os.path.join(self.path, name)
                try:
                    if name.startswith(".") and now - os.stat(full).st_mtime > max_age_s:
                        remove_file(full)
                except FileNotFoundError:
                    continue
        except FileNotFoundError:
            pass
        oldest = time.monotonic() - max_age_s
        for k in [k for k, got in self._arrived.items() if got.since < oldest]:
            del self._arrived[k]
        def held() -> int:  # each step buffer once, however many choices hold views of it
            buffers: dict[int, int] = {}
            for got in self._arrived.values():
                buffers.update(got.storages)
            return sum(buffers.values())

        total = held()
        for k, _ in sorted(self._arrived.items(), key=lambda kv: kv[1].since):
            if total <= max_bytes:
                break
            del self._arrived[k]
            total = held()
        return total

    @property
    def discarded(self) -> int:
        """Keys whose rows are still awaited to be dropped."""
        return len(self._graveyard)

    def pending(self) -> list[str]:
        """What is held: files not yet read, and ``key#index`` of choices with rows not yet taken."""
        try:
            files = sorted(os.listdir(self.path))
        except FileNotFoundError:
            files = []
        return files + sorted(f"{k}#{i}" for k, i in self._arrived)

    def close(self) -> None:
        self._graveyard.clear()
        self._arrived.clear()
        shutil.rmtree(self.path, ignore_errors=True)


def _owned_float(views: list["torch.Tensor"]) -> "torch.Tensor | None":
    """``views`` (into step buffers) as one float32 tensor of its own, copied once: a view handed
    on would keep a whole step's buffer (every capturing request's rows of that step, prefill
    chunks included) alive as long as the choice."""
    import torch

    if not views:
        return None
    if len(views) > 1:
        return torch.cat(views).float()  # cat copies; float() is then free for float32
    return views[0].clone() if views[0].dtype == torch.float32 else views[0].float()
