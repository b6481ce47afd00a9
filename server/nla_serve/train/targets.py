"""Warm-start explanation targets, built honestly from what the activation can know.

The authors' warm start used explanations written by a strong LLM. None can be called here, so a
target is assembled from two things only, both available to the residual stream at position p:

1. the text up to and including p (the activation is a function of exactly these tokens: never
   the tokens after p, never the document's name or source file), and
2. the target model's own next-token distribution at p (what it is about to do; at ~2/3 depth the
   layer-K row largely determines it).

From them the explanation says, in short paragraphs like the released AVs' (the last one about
the final token), in plain English:

- the kind of text it is (chat reply, user message, the genre the user asked for and its topic,
  scripture-like archaic prose, Python documentation, code) and two topic words, as judged from
  the visible text;
- optionally (``quote_words``, off by default) a quote of the local phrase, a few words at most (a
  longer quote, or the user's whole question, teaches the verbaliser to recite memorised quotes
  when it cannot read them; measured, even three words were mostly invented on unseen text);
- the final token, whether it sits mid-word or ends a sentence, and the words the model expects
  next, with how sure it is.

Nothing is claimed that the prefix and the predictions do not show; a genre is named only when the
visible text shows it (the register labels for the shipped corpora are what the text *reads as*).
Targets are 30-64 tokens: long enough to carry the token and context, short enough to be cheap to
generate. ``explanation_target`` returns the full ``<explanation>`` text the AV learns to write.
"""

from __future__ import annotations

import re
from collections import Counter

OPEN, CLOSE = "<explanation>", "</explanation>"
STOP = set("""a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not
now of off on once only or other our ours out over own same she should so some such than that the their theirs them
then there these they this those through to too under until up upon very was we were what when where which while
who whom why will with would you your yours assistant user system unto thee thou thy thine hath shall said saith also even came come went
like one two many much make made use used using may might must every""".split())
CODE = re.compile(r"(>>>|def |class |import |\breturn\b|==|\(\)|\w+\(\w*[,)]|\[\d*:|\w+\.\w+\()")
ARCHAIC = re.compile(r"\b(thee|thou|thy|hath|saith|unto|begat|shalt|ye)\b", re.I)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def show(piece: str) -> str:
    """A token as a reader sees it: quoted text, or a name for whitespace and byte pieces."""
    if piece == "" or "\ufffd" in piece:
        return "part of a multi-byte character"
    if piece.strip() == "":
        return "a line break" if "\n" in piece else "a space"
    if piece.strip() == '"':
        return "a double quotation mark"
    return f'"{piece.strip()}"'


def show_prediction(tokenizer, token_id: int) -> str | None:
    """How a predicted token reads, or None when it has no readable form."""
    if token_id == tokenizer.eos_token_id:
        return "the end of the message"
    if token_id in set(tokenizer.all_special_ids):
        return None
    piece = token_text(tokenizer, token_id)
    if piece == "" or "\ufffd" in piece:
        return None
    return show(piece)


def topic_words(text: str, n: int = 3) -> list[str]:
    words = WORD.findall(text)
    counts = Counter(w.lower() for w in words if len(w) >= 4 and w.lower() not in STOP)
    first: dict[str, str] = {}
    for w in words:
        first.setdefault(w.lower(), w)
    ranked = sorted(counts, key=lambda w: (-counts[w] - (0.5 if first[w][0].isupper() else 0), w))
    return [first[w] for w in ranked[:n]]


def register(rec: dict, text: str, recent: str) -> str:
    """What kind of text this is, as far as the tokens up to p show it. In a chat the genre the
    user asked for (``genres.py``) and its topic are in the user's message, which the activation
    has read; the user's words themselves are never quoted (the activation holds their gist, not
    their letters, and a verbaliser taught to quote them recites memorised questions instead)."""
    from nla_serve.train.genres import genre_name

    role, source = rec.get("role"), rec.get("source", "")
    genre, topic = genre_name(rec.get("genre")), rec.get("topic")
    about = f", about {topic}" if topic else ""
    if role == "assistant":
        kind = "An AI assistant's reply in a chat" + (f": {genre}{about}" if genre else "")
    elif role == "user":
        kind = "A user's message to an AI assistant" + (f", asking for {genre}{about}" if genre else " in a chat")
    elif role == "system":
        kind = "The system prompt at the start of a chat"
    elif genre:
        kind = genre[0].upper() + genre[1:] + ", as plain text"
    elif source == "kjv" or ARCHAIC.search(text):
        kind = "Archaic, King James-style scripture prose"
    elif source == "pydoc":
        kind = "Technical documentation about the Python language"
    else:
        kind = "Plain written prose"
    if CODE.search(recent):
        kind += ", currently inside code"
    return kind + "."


def position_note(tokenizer, rec: dict, piece: str) -> str:
    top = rec["top"]
    nxt = token_text(tokenizer, top[0][0]) if top else ""
    if piece.strip() and piece.strip()[-1] in ".!?":
        return " It ends a sentence."
    if piece.strip().isalpha() and nxt[:1].isalpha() and not nxt.startswith(" "):
        return " It is the start of a longer word."
    if piece.strip() in (",", ";", ":"):
        return " It is punctuation inside a sentence."
    return ""


def prediction_note(tokenizer, rec: dict, *, quoted: int = 1) -> str:
    """What the model expects next, from its own logits, quoting at most ``quoted`` candidates.

    One by default. The pair trained quoting up to three found its best guess in the text or the
    predictions about two times in three on unseen genres, its alternatives less often, and when it
    could not read them it wrote the same invented word three times ("wallet, wallet, wallet"),
    so the alternatives taught invention more than reading (docs/training.md)."""
    top = [(show_prediction(tokenizer, i), p) for i, p in rec["top"]]
    seen, opts = set(), []
    for s, p in top:
        if s is not None and s not in seen and (p >= 0.05 or not opts):
            seen.add(s)
            opts.append((s, p))
    if not opts or quoted < 1:
        return ""
    first, p0 = opts[0]
    if p0 >= 0.6:
        return f" The model is confident the next token is {first}."
    if len(opts) == 1 or quoted <= 1:
        return f" The model is unsure; {first} is its best guess for what comes next."
    rest = " or ".join(s for s, _ in opts[1:quoted])
    return f" Next, the model expects {first}, or perhaps {rest}."


def visible_text(tokenizer, rec: dict) -> tuple[str, str]:
    """-> (the prefix as text, the part of it the current message consists of). In a chat, the
    chat template's role labels and system prompt are scaffolding, not the message."""
    ids = rec["prefix_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "")
    role, user = rec.get("role"), (rec.get("user") or "")
    if role == "assistant" and rec.get("reply_start") is not None:
        return text, tokenizer.decode(ids[rec["reply_start"]:], skip_special_tokens=True).replace("\ufffd", "")
    if role == "user" and user[:12] and user[:12] in text:
        return text, text[text.index(user[:12]):]
    return text, text


def explanation_body(tokenizer, rec: dict, *, quote_words: int = 0, quote_predictions: int = 1,
                     max_tokens: int = 64) -> str:
    """Short paragraphs: the kind of text and its topic words; with ``quote_words`` > 0, the local
    phrase (its last ``quote_words`` words); the final token and the model's own next-token
    expectations.

    The local phrase is off by default. Measured on the pair trained with three-word phrases: on
    text of unseen genres its AV's local-phrase quotes were found in the text one time in five,
    against nine in ten for its final-token quotes and about seven in ten for the predicted words,
    so that quote taught invention, not reading (docs/training.md)."""
    text, message = visible_text(tokenizer, rec)
    piece = token_text(tokenizer, rec["token"])
    words = message[-400:].split()
    chat = rec.get("role") in ("assistant", "user")
    topics = topic_words(message if chat else text, n=2)
    kind = register(rec, text, " ".join(words[-3:]))  # the last words only tell whether it is code
    if topics:
        kind += " Its topic words include " + " and ".join(topics) + "."
    last = (f"The final token is {show(piece)}." + position_note(tokenizer, rec, piece)
            + prediction_note(tokenizer, rec, quoted=quote_predictions))
    body = f"{kind}\n\n{last}"
    for q in range(quote_words, 0, -1):  # over budget: the quote shrinks first, then goes
        phrase = (f'The local phrase is "{" ".join(words[-q:])}".' if len(words) >= 2
                  else "The message has only just begun.")
        phrased = f"{kind}\n\n{phrase}\n\n{last}"
        if len(tokenizer.encode(phrased, add_special_tokens=False)) <= max_tokens:
            return phrased
    return body


def tagged(body: str) -> str:
    """An explanation body as the AV writes it, between its tags."""
    return f"{OPEN}\n{body}\n{CLOSE}"


def explanation_target(tokenizer, rec: dict, **kw) -> str:
    """The whole text the AV is trained to write for this sample (tags included)."""
    return tagged(explanation_body(tokenizer, rec, **kw))
