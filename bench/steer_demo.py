"""The README's steering example, on a running server (`make serve`): explain the last token of a
prompt, edit one of the explanation's claims (see edit_claim), patch the edit back, and compare
with a neutral rewording and a random direction of the same strength. Prints one JSON object.

    .venv/bin/python bench/steer_demo.py [--url http://127.0.0.1:8000] [--prompt TEXT] [--to WORD]
"""

from __future__ import annotations

import argparse
import json
import re

import httpx


NEXT_KIND = re.compile(r"The model is (?:confident that .+? comes next|unsure what comes next, most likely .+?)\.")
QUOTE = re.compile(r'"[^"]+"')


def edit_claim(original: str, to: str | None) -> tuple[str, str]:
    """(edited, control): the explanation with one claim changed, and the same explanation with
    the final-token claim reworded in the NLA's own style (a change that says nothing new). The
    edited claim: an NLA's kind-of-next-token claim (to a kind, default punctuation); else the last
    quoted word after the final token (to a word, default London: an older NLA's guessed next
    word); else, where the shipped NLA says nothing of the next token (a new word comes), that
    kind-of-next-token claim added after the final token's."""
    kind = NEXT_KIND.search(original)
    quotes = list(QUOTE.finditer(original))
    claim = f"The model is confident that {to or 'punctuation'} comes next."
    if kind is not None:
        edited = original.replace(kind.group(0), claim, 1)
    elif len(quotes) >= 2:  # the first quote is the final token, which the control rewords
        last = quotes[-1]
        edited = original[:last.start()] + json.dumps(to or "London") + original[last.end():]
    else:  # the shipped NLA says nothing of the next token when a new word comes: say it does not
        head, sep, tail = original.partition("\n\n")
        edited = f"{head} {claim}{sep}{tail}"
    control = original.replace("The final token is", "The last token is", 1)
    return edited, control


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default="none")
    p.add_argument("--prompt", default="The capital of France is the city of")
    p.add_argument("--to", default=None,
                   help="what the edited claim says: a kind of token for a kind-of-next-token claim, edited or "
                        "added (default punctuation), else the word that replaces a guessed one (default London)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--strength", type=float, default=None, help="default: the edit's own size")
    args = p.parse_args()
    h = {"Authorization": f"Bearer {args.key}"}
    model = httpx.get(args.url + "/v1/models", headers=h, timeout=30).json()["data"][0]["id"]
    explained = httpx.post(args.url + "/v1/explanations", headers=h, timeout=300, json={
        "model": model, "input": args.prompt, "claims": True}).json()
    item = explained["data"][-1]
    original = item["text"]
    edited, control = edit_claim(original, args.to)
    report = httpx.post(args.url + "/v1/explanations/counterfactual", headers=h, timeout=300, json={
        "model": model, "input": args.prompt, "explanation": original, "edited": edited, "control": control,
        "max_tokens": args.max_tokens, **({"strength": args.strength} if args.strength is not None else {})}).json()
    print(json.dumps({"prompt": args.prompt, "token_index": item["token_index"], "fve": item["fve"],
                      "claims": item.get("claims"), "original": original, "edited": edited, "control": control,
                      "report": report}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
