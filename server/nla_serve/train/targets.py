"""Warm-start explanation targets, built honestly from what the activation can know.

The authors' warm start used explanations written by a strong LLM. None can be called here, so a
target is assembled from two things only, both available to the residual stream at position p:

1. the text up to and including p (the activation is a function of exactly these tokens: never
   the tokens after p, never the document's name or source file), and
2. the target model's own next-token distribution at p (what it is about to do; at ~2/3 depth the
   layer-K row largely determines it).

From them the explanation says, in short paragraphs, most informative first (so a verbaliser cut
short by ``max_tokens`` still says what matters most), in plain English:

- the final token, whether it sits mid-word or ends a sentence, and what kind of token the model
  expects next (the rest of the word, punctuation, a line break, ...) with how sure it is, unless
  it is a new word, which the token already implies (``next_token``: "kind" says it everywhere,
  "quoted" quotes the tokens instead, measured unreadable; "none" says nothing);
- optionally (``previous_token``, off by default) the token before the final one (measured: the
  pair trained with it wrote it wrong often enough to fail grounding, see ``previous_note``);
- optionally (``quote_words``, off by default) a quote of the local phrase, a few words at most (a
  longer quote, or the user's whole question, teaches the verbaliser to recite memorised quotes
  when it cannot read them; measured, even three words were mostly invented on unseen text);
- the kind of text it is, where the pair reads it (user message, system prompt, scripture-like
  archaic prose, Python documentation, code), never the genre or topic, and nothing for an
  assistant's reply or other modern prose (measured unsupported: see ``register``).

Nothing is claimed that the prefix and the predictions do not show. Targets are 10-45 tokens
(24 on average, without the tags): every claim one the reconstructor was measured to read.
``explanation_target`` returns the full ``<explanation>`` text the AV learns to write.
"""

from __future__ import annotations

import re

OPEN, CLOSE = "<explanation>", "</explanation>"
CODE = re.compile(r"(>>>|def |class |import |\breturn\b|==|\(\)|\w+\(\w*[,)]|\[\d*:|\w+\.\w+\()")
NEXT_TOKEN = ("none", "kind", "kind-except-new-word", "quoted")  # what targets say of the next token
ARCHAIC = re.compile(r"\b(thee|thou|thy|hath|saith|unto|begat|shalt|ye)\b", re.I)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def show(piece: str) -> str:
    """A token as a reader sees it: quoted text, or a name for whitespace and byte pieces."""
    if piece == "" or "\ufffd" in piece:
        return "part of a multi-byte character"
    if piece.strip() == "":
        return "a line break" if "\n" in piece else "a space"
    if '"' in piece:  # never a quote inside quotes: readers and the claim splitter would lose the token
        rest = piece.strip().replace('"', "")
        return "a double quotation mark" + (f' with "{rest}"' if rest else "")
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


def register(rec: dict, text: str, recent: str) -> str:
    """What kind of text this is, only where the pair was measured to read it: a user's message or
    the system prompt (the chat template is a few tokens back), scripture-like archaic prose, Python
    documentation; "" for an assistant's reply and other plain modern prose, which say nothing.

    An assistant's reply and the same kind of text outside a chat are one text to the activation:
    the pair trained to tell them apart called half the replies "Plain text outside a chat" and the
    other way round, and either claim added +0.02 to +0.04 FVE whether it was right or wrong
    (300 held-out rows, 2026-12-07; docs/training.md). Saying nothing there is the honest claim.
    Never the genre or topic the user asked for: scoring each claim with the reconstructor showed
    the pair carried none of them (support +0.016 on held-out human text)."""
    role, source = rec.get("role"), rec.get("source", "")
    if role == "assistant":
        kind = ""
    elif role == "user":
        kind = "A user's message to an AI assistant"
    elif role == "system":
        kind = "The system prompt at the start of a chat"
    elif source == "kjv" or ARCHAIC.search(text):
        kind = "Archaic, King James-style scripture prose"
    elif source == "pydoc":
        kind = "Technical documentation about the Python language"
    else:
        kind = ""
    if CODE.search(recent):
        return kind + ", currently inside code." if kind else "Currently inside code."
    return kind + "." if kind else ""


def position_note(tokenizer, rec: dict, piece: str) -> str:
    """What the final token does where it stands, as a clause of the final-token sentence (a fact
    about the token, so it is part of that claim, not a claim of its own)."""
    top = rec["top"]
    nxt = token_text(tokenizer, top[0][0]) if top else ""
    if piece.strip() and piece.strip()[-1] in ".!?" and not nxt[:1].isdigit():  # "10." + "5" is no sentence end
        return ", which ends a sentence"
    if piece.strip().isalpha() and nxt[:1].isalpha() and not nxt.startswith(" "):
        return ", the start of a longer word"
    if piece.strip() in (",", ";", ":"):
        return ", punctuation inside a sentence"
    return ""


def next_kind(tokenizer, token_id: int, after_break: bool = False) -> str:
    """What kind of token a predicted one is, in words: the grain at which the pair reads the
    model's next-token expectation (see ``prediction_note``). ``after_break``: the final token
    ends in a line break, so a word with no space before it starts a new word all the same."""
    if token_id == tokenizer.eos_token_id or token_id in set(tokenizer.all_special_ids):
        return "the end of the message"
    piece = token_text(tokenizer, token_id)
    word = piece.strip()
    if "\n" in piece:
        return "a line break"
    if not word or "\ufffd" in piece:
        return "a space" if not word else "a symbol"
    if word.isdigit():
        return "a number"
    if not any(ch.isalnum() for ch in word):
        return "punctuation"
    return "a new word" if piece[:1].isspace() or after_break else "the rest of the current word"


def previous_note(tokenizer, rec: dict) -> str:
    """The token before the final one, as a claim of its own ("" at the first token): context the
    final token does not carry, from a large vocabulary, so a right claim should stand out from a
    foreign one. Off by default, as measured (the pair trained with it instead of the next-token
    kind, 2026-12-08, docs/training.md): unseen-genre FVE rose 0.318 -> 0.338 but human-text FVE
    did not (0.276 -> 0.278); its AV wrote the token before wrong often ("The token before it is
    "example"" after "dinosaurs."), so quotes found fell to 77% (from 94%), and the claim was
    supported 29% / 16% of the time (unseen / human): the refit teaches the AR to discount a claim
    its AV gets wrong that often."""
    ids = rec["prefix_ids"]
    if len(ids) < 2:
        return ""
    return f" The token before it is {show(token_text(tokenizer, ids[-2]))}."


def prediction_note(tokenizer, rec: dict, *, next_token: str = "kind-except-new-word", quoted: int = 1) -> str:
    """What the model expects next, from its own logits, as ``next_token`` says: "kind" the kind
    of token (a new word, the rest of the current word, punctuation, a line break, a number, the
    end of the message) holding the most of the top predictions' probability, "confident" at 60%
    or more; "kind-except-new-word" (the default) the same, but nothing when that kind is a new
    word; "quoted" the tokens themselves, at most ``quoted`` of them; "none" nothing.

    The kind, not the token. Measured on the pair trained to quote its best guess (300 held-out
    rows, 2026-12-07): its AV named the model's top token 19-45% of the time, no better where the
    model was over 80% sure, and the reconstructor gave a wrong guess about the support of a right
    one; yet the pair trained with no guess at all lost 0.03 FVE (0.321 -> 0.293 on unseen
    genres), so the guess carried something coarser than its word, which is what the kind says.
    The kind is right almost always, but the pair trained to say it everywhere had it supported
    about one time in five; by kind, on its unseen / human eval rows, "a new word" (the likeliest
    kind at two rows in three, and what the final token already implies) 10% / 15%, punctuation
    60% / 47%, a number 43%: hence "kind-except-new-word" (supported 78% / 74% of all claims,
    against 59% / 62%, at the same FVE; docs/training.md). The pair quoting three candidates wrote
    the same invented word three times ("wallet, wallet, wallet") when it could not read them."""
    if next_token not in NEXT_TOKEN:
        raise ValueError(f"next_token must be one of {', '.join(NEXT_TOKEN)}, got {next_token!r}")
    if next_token == "none":
        return ""
    if next_token in ("kind", "kind-except-new-word"):
        mass: dict[str, float] = {}
        after_break = token_text(tokenizer, rec["token"]).endswith("\n")
        for i, p in rec["top"]:
            kind = next_kind(tokenizer, i, after_break)
            mass[kind] = mass.get(kind, 0.0) + p
        if not mass:
            return ""
        kind, p = max(mass.items(), key=lambda kv: kv[1])
        if kind == "a new word" and next_token == "kind-except-new-word":
            return ""  # the commonest expectation, and the one the pair's support showed redundant
        return (f" The model is confident that {kind} comes next." if p >= 0.6
                else f" The model is unsure what comes next, most likely {kind}.")
    top = [(show_prediction(tokenizer, i), p) for i, p in rec["top"]]
    seen, opts = set(), []
    for s, p in top:
        if s is not None and s not in seen and (p >= 0.05 or not opts):
            seen.add(s)
            opts.append((s, p))
    if not opts:
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


def explanation_body(tokenizer, rec: dict, *, previous_token: bool = False,
                     next_token: str = "kind-except-new-word", quote_predictions: int = 1, quote_words: int = 0,
                     max_tokens: int = 64) -> str:
    """Most informative claim first, so a short ``max_tokens`` still gets it (Matryoshka-style):
    the final token and what it does there; the model's own next-token expectation; then the kind
    of text. With ``quote_words`` > 0 a middle paragraph quotes the local phrase (its last
    ``quote_words`` words).

    The local phrase is off by default. Measured on the pair trained with three-word phrases: on
    text of unseen genres its AV's local-phrase quotes were found in the text one time in five,
    against nine in ten for its final-token quotes and about seven in ten for the predicted words,
    so that quote taught invention, not reading (docs/training.md)."""
    text, message = visible_text(tokenizer, rec)
    piece = token_text(tokenizer, rec["token"])
    words = message[-400:].split()
    kind = register(rec, text, " ".join(words[-3:]))  # the last words only tell whether it is code
    first = (f"The final token is {show(piece)}" + position_note(tokenizer, rec, piece) + "."
             + (previous_note(tokenizer, rec) if previous_token else "")
             + prediction_note(tokenizer, rec, next_token=next_token, quoted=quote_predictions))
    body = f"{first}\n\n{kind}" if kind else first
    for q in range(quote_words, 0, -1):  # over budget: the quote shrinks first, then goes
        phrase = (f'The local phrase is "{" ".join(words[-q:])}".' if len(words) >= 2
                  else "The message has only just begun.")
        phrased = "\n\n".join(part for part in (first, phrase, kind) if part)
        if len(tokenizer.encode(phrased, add_special_tokens=False)) <= max_tokens:
            return phrased
    return body


def tagged(body: str) -> str:
    """An explanation body as the AV writes it, between its tags."""
    return f"{OPEN}\n{body}\n{CLOSE}"


def explanation_target(tokenizer, rec: dict, **kw) -> str:
    """The whole text the AV is trained to write for this sample (tags included)."""
    return tagged(explanation_body(tokenizer, rec, **kw))
