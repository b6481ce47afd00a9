"""An uploaded batch input file, checked line by line before any batch runs it.

Each line is OpenAI's request object: ``{"custom_id": ..., "method": "POST", "url": <endpoint>,
"body": {...}}``. The file is refused as a whole (400, naming the line) when a line is not JSON,
not such an object, names another endpoint than the batch's, repeats a ``custom_id``, or asks for
a stream; the bodies themselves are checked by the routes when the lines run (a bad body is that
line's 400 in the error file, as on OpenAI).
"""

from __future__ import annotations

import json

from nla_serve.errors import ClientError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/explanations")


def parse_lines(content: bytes, *, endpoint: str | None, max_lines: int) -> list[tuple[str, dict]]:
    """-> [(custom_id, body)] in file order; ``endpoint`` None checks each line against any of ours."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClientError(f"the batch file is not UTF-8 text ({e.reason} at byte {e.start})", param="input_file_id")
    out: list[tuple[str, dict]] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"line {n} of the batch file"
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ClientError(f"{where} is not JSON ({e.msg} at column {e.colno}): the file must be JSONL, one "
                              "request object per line", param="input_file_id") from None
        if not isinstance(line, dict) or set(line) - {"custom_id", "method", "url", "body"}:
            raise ClientError(f"{where} must be an object with custom_id, method, url and body only",
                              param="input_file_id")
        cid, method, url, body = line.get("custom_id"), line.get("method"), line.get("url"), line.get("body")
        if not isinstance(cid, str) or not cid or len(cid) > 512:
            raise ClientError(f"{where} needs a custom_id: a non-empty string of at most 512 characters",
                              param="input_file_id")
        if cid in seen:
            raise ClientError(f"{where} repeats custom_id {cid!r}: each line's must be unique", param="input_file_id")
        seen.add(cid)
        if method != "POST":
            raise ClientError(f"{where} has method {method!r}; batch requests are POST", param="input_file_id")
        if url not in ENDPOINTS:
            raise ClientError(f"{where} asks for {url!r}; a batch line may call {', '.join(ENDPOINTS)}",
                              param="input_file_id")
        if endpoint is not None and url != endpoint:
            raise ClientError(f"{where} asks for {url}, but the batch's endpoint is {endpoint}", param="input_file_id")
        if not isinstance(body, dict):
            raise ClientError(f"{where} needs a body: the request object", param="input_file_id")
        if body.get("stream"):
            raise ClientError(f"{where} asks for a stream; batch answers are whole responses", param="input_file_id")
        out.append((cid, {"url": url, "body": body}))
        if len(out) > max_lines:
            raise ClientError(f"the batch file has more than {max_lines} requests, this server's limit",
                              param="input_file_id")
    if not out:
        raise ClientError("the batch file has no request lines", param="input_file_id")
    return out
