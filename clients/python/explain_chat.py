"""Ask nla-serve a question with the official openai SDK and print the explanations.

    python clients/python/explain_chat.py "What is the capital of France?" --url http://127.0.0.1:8000/v1

Works against any nla-serve; the only nla-serve specifics are `extra_body={"explain": ...}` in the
request and `model_extra["explanations"]` in the response.
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("NLA_SERVE_API_KEY", "none"))
    p.add_argument("--positions", default="auto")
    p.add_argument("--max-explanations", type=int, default=4)
    p.add_argument("--stream", action="store_true")
    args = p.parse_args()

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id
    explain = {"positions": args.positions, "max_explanations": args.max_explanations}
    messages = [{"role": "user", "content": args.question}]
    items = []
    if args.stream:
        for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    extra_body={"explain": explain}):
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
            items += (chunk.model_extra or {}).get("explanations") or []
        print()
    else:
        r = client.chat.completions.create(model=model, messages=messages, extra_body={"explain": explain})
        print(r.choices[0].message.content)
        items = r.model_extra.get("explanations", [])
    for e in items:
        where = f"{e.get('source')} token {e.get('token_index')} {e.get('token')!r}" if "token_index" in e else ""
        fve = f"fve={e['fve']:.2f}" if e.get("fve") is not None else "fve=n/a"
        print(f"\n[{e['status']}] {where} {fve}")
        print(e.get("text") or e.get("reason"))


if __name__ == "__main__":
    main()
