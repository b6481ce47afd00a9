"""Broad English written by the target itself: a grid of genre x topic x format.

Nothing can be downloaded on these machines, and the shipped corpora (KJV, pydoc) are two narrow
registers. A chat server sees everything else: recipes, emails, code, stories, notes. So the target
writes it: each grid cell is one prompt ("Write a recipe about coffee, as numbered steps."), the
target answers it with sampling, and the answer becomes one document, in one of two forms chosen
by a stable hash of the cell: a chat transcript (the exact ids the target saw and wrote, as
``chats.py`` keeps them) or the answer alone as plain text (BOS + text, as a completions request
or a pasted document reaches the server).

Genres and topics in ``UNSEEN_GENRES`` / ``UNSEEN_TOPICS`` are never trained on: their documents
get the split ``unseen`` at collection, so the evaluation can report how the NLA does on kinds of
text it never saw (the issue's own probes: recipes, emails, sports reports, SQL, clinical notes,
fairy tales), next to the ``heldout`` split of unseen *documents* of seen genres.

The answers are written by ``writer.TextWriter`` (vLLM when installed, else batched transformers).
Answers are appended batch by batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from nla_serve.train.corpus import Document
from nla_serve.train.writer import TextWriter, write_answers

# name -> (how the prompt asks for it, how an explanation names it)
GENRES: dict[str, tuple[str, str]] = {
    "news": ("Write a short news report about {topic}.", "a news report"),
    "review": ("Write a customer review of a product related to {topic}.", "a product review"),
    "email": ("Write an email to a colleague about {topic}.", "an email"),
    "text_message": ("Write a casual text message to a friend about {topic}.", "a casual text message"),
    "recipe": ("Write a recipe inspired by {topic}.", "a recipe"),
    "fairy_tale": ("Write a fairy tale about {topic}.", "a fairy tale"),
    "story": ("Write a short story about {topic}.", "a short story"),
    "poem": ("Write a poem about {topic}.", "a poem"),
    "sports_report": ("Write a sports report of a match connected to {topic}.", "a sports report"),
    "sql": ("Write an SQL query for a database about {topic}, and explain it.", "SQL code with an explanation"),
    "python": ("Write a small Python function related to {topic}, with a docstring.", "Python code"),
    "javascript": ("Write a short JavaScript snippet related to {topic}.", "JavaScript code"),
    "shell": ("Write shell commands to organise files about {topic}.", "shell commands"),
    "clinical_note": ("Write a doctor's clinical note about a patient, connected to {topic}.", "a clinical note"),
    "legal": ("Write a formal legal notice about {topic}.", "a legal notice"),
    "cover_letter": ("Write a cover letter for a job connected to {topic}.", "a cover letter"),
    "minutes": ("Write the minutes of a meeting about {topic}.", "meeting minutes"),
    "faq": ("Write a short FAQ about {topic}.", "an FAQ"),
    "travel": ("Write a travel guide entry about {topic}.", "a travel guide"),
    "history": ("Write a short history lesson about {topic}.", "a history lesson"),
    "science": ("Explain the science behind {topic}.", "a science explanation"),
    "synopsis": ("Write a movie synopsis about {topic}.", "a movie synopsis"),
    "diary": ("Write a diary entry about {topic}.", "a diary entry"),
    "advert": ("Write an advertisement for something related to {topic}.", "an advertisement"),
    "job_post": ("Write a job posting connected to {topic}.", "a job posting"),
    "how_to": ("Write a how-to guide about {topic}.", "a how-to guide"),
    "speech": ("Write a short speech about {topic}.", "a speech"),
    "interview": ("Write an interview with an expert on {topic}.", "an interview"),
    "complaint": ("Write a letter of complaint about {topic}.", "a complaint letter"),
    "weather": ("Write a weather forecast for a day about {topic}.", "a weather forecast"),
    "lecture": ("Write lecture notes about {topic}.", "lecture notes"),
    "biography": ("Write a short biography of someone known for {topic}.", "a biography"),
    "dialogue": ("Write a dialogue between two friends about {topic}.", "a dialogue"),
    "opinion": ("Write an opinion piece about {topic}.", "an opinion piece"),
    "product": ("Write a product description for something related to {topic}.", "a product description"),
    "quiz": ("Write five quiz questions about {topic}, with answers.", "a quiz"),
}
TOPICS = [
    "coffee", "the moon", "volcanoes", "friendship", "bicycles", "a new phone", "city parks", "a lost wallet",
    "elections", "a football match", "winter storms", "gardening", "a small bakery", "electric cars",
    "a hospital visit", "a birthday party", "the stock market", "a school trip", "honey bees", "an old castle",
    "a broken laptop", "a marathon", "the ocean", "a job interview", "a wedding", "a library", "recycling",
    "chess", "a train journey", "a haunted house", "dinosaurs", "a flu outbreak", "a music festival", "a farm",
    "space travel", "a cooking contest", "a dentist appointment", "a museum", "a hiking trail", "a rainy day",
]
FORMATS = ["", " Keep it under 100 words.", " Use a bulleted list.", " Use numbered steps.", " Give it a title.",
           " Write it in two short paragraphs.", " Use simple words."]
# never trained on: the genres the issue probed, and a few topics
UNSEEN_GENRES = frozenset({"recipe", "email", "sports_report", "sql", "clinical_note", "fairy_tale"})
UNSEEN_TOPICS = frozenset({"honey bees", "a train journey", "chess", "a haunted house", "a dentist appointment"})


def _hash(*parts: str) -> int:
    return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8], 16)


def grid(n: int | None = None, seed: int = 0) -> list[dict]:
    """Grid cells in a seeded order: one per genre x topic, with a format and a form (chat or
    plain text) fixed by the cell; the first ``n``, spread over every genre and topic."""
    cells = []
    for g, (ask, _) in GENRES.items():
        for t in TOPICS:
            h = _hash(str(seed), g, t)
            fmt = FORMATS[h % len(FORMATS)]
            cells.append({"genre": g, "topic": t, "prompt": ask.format(topic=t) + fmt,
                          "form": "chat" if (h >> 8) % 2 == 0 else "text",
                          "unseen": g in UNSEEN_GENRES or t in UNSEEN_TOPICS})
    random.Random(seed).shuffle(cells)
    return cells[:n] if n is not None else cells


def genre_name(genre: str | None) -> str | None:
    return GENRES[genre][1] if genre in GENRES else None


def document(i: int, cell: dict, prompt_ids: list[int], answer_ids: list[int], answer_text: str) -> Document:
    extra = {k: cell[k] for k in ("genre", "topic", "form")} | ({"unseen": True} if cell["unseen"] else {})
    if cell["form"] == "chat":
        return Document(id=f"genre-{i}", source="genres", ids=prompt_ids + answer_ids, prompt_len=len(prompt_ids),
                        user=cell["prompt"], text=answer_text, extra=extra)
    return Document(id=f"genre-{i}", source="genres", text=answer_text.strip(), extra=extra)


def generate_genres(target: str, out: Path, n: int, *, max_new_tokens: int = 160, seed: int = 0,
                    device: str = "cpu", engine: str = "auto", batch_size: int = 16,
                    progress: bool = True, writer: "TextWriter | None" = None) -> list[Document]:
    """Append grid documents to ``out`` (jsonl) until it holds ``n``; return all ``n``."""
    cells = grid(n, seed)
    return write_answers(target, out, [c["prompt"] for c in cells],
                         lambda i, x, g, text: document(i, cells[i], x, g, text), max_new_tokens=max_new_tokens,
                         seed=seed, device=device, engine=engine, batch_size=batch_size, progress=progress,
                         desc="genres", writer=writer)
