"""Warm-start targets written by a stronger model behind an OpenAI-compatible endpoint.

The paper's warm start used explanations written by a large model. A user with a GPU and a big
instruct model (served by vLLM, this server, or any OpenAI-compatible API) can have it write the
target explanation of every sampled position: ``nla-serve train --targets-url URL --targets-model
NAME``, with the key in ``NLA_SERVE_TARGETS_API_KEY`` (or ``OPENAI_API_KEY``). The writer is shown
exactly what the activation can know, and nothing else:

- the text the target read up to and including the position (its last ``CONTEXT_CHARS``
  characters, chat template rendered as text),
- the final token, and
- the target's own top next-token predictions there, with probabilities.

It is asked for three short paragraphs like the released AVs' (kind of text and topic; the local
phrase, quoted exactly; the final token and what comes next), quoting only what is shown (the
prompt is ``SYSTEM`` + ``writer_messages``; docs/training.md prints it). Each answer is checked by
the same grounding the server applies (explain/grounding.py), and the share of quotes found is
reported with the stage's stats.

Calls run ``concurrency`` at a time with retries (connection errors, 408/409/429/5xx: exponential
backoff; other 4xx fail at once with the endpoint's message), behind a progress bar. Every target
is appended to ``WORK/targets.remote.jsonl`` as it arrives, so an interrupted stage resumes where
it stopped and never asks for a finished row again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

CONTEXT_CHARS = 1200
KEY_ENVS = ("NLA_SERVE_TARGETS_API_KEY", "OPENAI_API_KEY")
RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}

SYSTEM = ("You explain what a language model is internally representing at one token of a text. You are "
          "shown exactly what the model has read and what it predicts next; you know nothing else about it.")

INSTRUCTIONS = """Write exactly three short paragraphs, 50 to 100 words in all, in plain English, no lists or headings:
1. What kind of text this is (a chat reply, a user's question, code, documentation, a story...) and its topic, as far as the text shows.
2. The local phrase the final token belongs to, quoting at most six words copied exactly from the end of the text.
3. The final token and its role, then what the model expects next, from the predictions listed.
Quote only words that appear verbatim in the text or among the predictions. Never guess at anything that is not shown (not the user's question if it is not in the text, not the rest of a document). Write only the three paragraphs."""


class TargetWriterError(RuntimeError):
    """The endpoint could not write a target (after retries): the stage stops; rerunning resumes."""


def api_key_from_env() -> str | None:
    for name in KEY_ENVS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def writer_messages(tokenizer, rec: dict) -> list[dict]:
    """The chat sent for one sampled position (``rec`` as collected: prefix_ids, token, top)."""
    from nla_serve.train.targets import show, show_prediction

    text = tokenizer.decode(rec["prefix_ids"], skip_special_tokens=False).replace("\ufffd", "")
    shown = text[-CONTEXT_CHARS:]
    piece = tokenizer.decode([rec["token"]])
    preds = []
    for token_id, p in rec["top"]:
        s = show_prediction(tokenizer, token_id)
        if s is not None:
            preds.append(f"{s} ({100 * p:.0f}%)")
    cut = "(earlier text omitted) " if len(text) > len(shown) else ""
    user = (f"Text the model has read so far; the activation is at its very last token:\n<<<\n{cut}{shown}\n>>>\n\n"
            f"Final token: {show(piece)}\n"
            f"The model's top predictions for the next token: {', '.join(preds) or 'none readable'}\n\n"
            + INSTRUCTIONS)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def clean_body(content: str | None) -> str:
    """The explanation body from an answer: tags the writer may have added removed, blank lines
    between paragraphs kept, other whitespace collapsed."""
    from nla_serve.train.targets import CLOSE, OPEN

    text = (content or "").replace(OPEN, "").replace(CLOSE, "").strip()
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paras if p)


@dataclass(frozen=True)
class WriterSettings:
    url: str
    model: str
    api_key: str | None = None
    concurrency: int = 8
    retries: int = 4
    timeout_s: float = 120.0
    max_tokens: int = 200
    temperature: float = 0.0


class TargetWriter:
    """Writes targets for ``(i, rec)`` rows through ``/v1/chat/completions`` of ``settings.url``."""

    def __init__(self, settings: WriterSettings, tokenizer):
        import httpx

        self.s = settings
        self.tokenizer = tokenizer
        base = settings.url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.client = httpx.Client(timeout=settings.timeout_s, headers=headers)
        self.requests = 0
        self._lock = threading.Lock()

    def write_one(self, i: int, rec: dict) -> str:
        import httpx

        messages = writer_messages(self.tokenizer, rec)
        last = "no attempt"
        for attempt in range(self.s.retries + 1):
            if attempt:
                time.sleep(min(30.0, 0.5 * 2 ** (attempt - 1)))
            body = {"model": self.s.model, "messages": messages, "max_tokens": self.s.max_tokens,
                    # a retry after an empty answer samples instead of repeating it
                    "temperature": self.s.temperature if attempt == 0 else max(self.s.temperature, 0.7)}
            try:
                with self._lock:
                    self.requests += 1
                r = self.client.post(self.endpoint, json=body)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRY_STATUSES:
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                continue
            if r.status_code != 200:
                raise TargetWriterError(f"{self.endpoint} refused the request for row {i} (HTTP {r.status_code}): "
                                        f"{r.text[:500]}")
            try:
                content = r.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                last = f"an answer that is not an OpenAI chat completion: {r.text[:300]}"
                continue
            cleaned = clean_body(content)
            if cleaned:
                return cleaned
            last = "an empty answer"
        raise TargetWriterError(f"{self.endpoint} could not write the target of row {i} after "
                                f"{self.s.retries + 1} attempts (last: {last}); rerun to resume")

    def write_all(self, rows: list[tuple[int, dict]], out: Path, progress: bool = True) -> int:
        """Append a target line for every row not already in ``out``; returns how many were written now."""
        from nla_serve.train.targets import tagged

        done = done_rows(out)
        todo = [(i, rec) for i, rec in rows if i not in done]
        if not todo:
            return 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="targets from " + self.s.model,
                       unit="row")
        written = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        torn = out.is_file() and out.stat().st_size and not out.read_bytes().endswith(b"\n")
        with open(out, "a", encoding="utf-8") as f, ThreadPoolExecutor(self.s.concurrency) as pool:
            if torn:  # a crash cut the last line short: start on a fresh line
                f.write("\n")
            futures = {pool.submit(self.write_one, i, rec): i for i, rec in todo}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    body = fut.result()
                    f.write(json.dumps({"i": i, "body": body, "text": tagged(body),
                                        "writer": self.s.model}, ensure_ascii=False) + "\n")
                    f.flush()  # a line per finished row: an interrupted run resumes after it
                    written += 1
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
            finally:
                if bar is not None:
                    bar.close()
        return written


def done_rows(path: Path) -> set[int]:
    """Rows already written to ``path`` (a torn last line from a crash is ignored and redone)."""
    done: set[int] = set()
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(int(json.loads(line)["i"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done
