"""FVE against explanation length for the shipped NLA: where a verbaliser stop would pay.

    python bench/explanation_length.py [--docs 12] [--positions 4] [--out bench-results/length.json]

1. Rows of the default model at its NLA layer, from held-out text written by people (King James
   and Python documentation chapters the NLA never trained on) and from answers the model writes
   to chat prompts now (temperature 0.7), ``--positions`` sampled positions per document as the
   trainer samples them (``train/activations.collect``), every sampled row counted.
2. Each row explained at full length by the server's own NLA runtime (vLLM verbaliser, greedy).
3. The same explanations cut to their first 1, 2, ... sentences (the claim splitter's sentences)
   and to their first 8, 16, 24, 32 tokens, each cut scored by the reconstructor like the whole.

Prints and writes one JSON object: per source and overall, mean FVE and mean verbaliser tokens of
each cut, so the FVE each extra sentence or token buys can be read off.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import tempfile
from pathlib import Path

TOKEN_CUTS = (8, 16, 24, 32)


def documents(n: int, root: Path, target: str) -> list:
    from nla_serve.train.chats import generate_chats
    from nla_serve.train.corpus import is_heldout, kjv_documents, pydoc_documents

    human = []
    for source in (kjv_documents(), pydoc_documents()):
        human += list(itertools.islice((d for d in source if is_heldout(d.source, d.id, 0.1)), n // 2))
    # prompts from the end of the trainer's shuffled pool, with a seed of their own
    chats = generate_chats(target, root / "chats.jsonl", n, max_new_tokens=120, seed=9173, engine="transformers",
                           progress=False)
    return human + chats


async def measure(args) -> dict:
    import torch

    from nla_serve.config import ServerSettings
    from nla_serve.explain.claims import split_claims
    from nla_serve.provision import default_model_dir
    from nla_serve.service import Service
    from nla_serve.train.activations import collect

    target = str(default_model_dir())
    root = Path(tempfile.mkdtemp(prefix="nla-length-"))
    svc = await Service.start(ServerSettings.flat(engine="vllm", max_model_len=1024))
    try:
        layer = svc.nla.layer
        acts = collect(target, documents(args.docs, root, target), layer, root / "acts",
                       positions_per_doc=args.positions, heldout_fraction=0.0, progress=False)
        vectors = acts.vectors.to(torch.float32)
        sources = ["model" if r["source"] == "chat" else "human" for r in acts.records]
        full = await svc.nla.explain_vectors(vectors, max_tokens=svc.settings.explain.max_tokens)
        tok = svc.tokenizer
        cuts: dict[str, list] = {"full": full}
        most = max(len(split_claims(e.text or "")) for e in full)
        for k in range(1, most):
            cuts[f"{k} sentence{'s' if k > 1 else ''}"] = [
                dataclasses.replace(e, text=" ".join(c.text for c in split_claims(e.text or "")[:k]),
                                    tokens=len(tok.encode(" ".join(c.text for c in split_claims(e.text or "")[:k]),
                                                          add_special_tokens=False)), fve=None) for e in full]
        for n in TOKEN_CUTS:
            cut = []
            for e in full:
                ids = tok.encode(e.text or "", add_special_tokens=False)
                cut.append(dataclasses.replace(e, text=tok.decode(ids[:n]), tokens=min(n, len(ids)), fve=None))
            cuts[f"{n} tokens"] = cut
        for name, exps in cuts.items():
            if name != "full":
                await svc.nla.score(exps, vectors)
    finally:
        await svc.stop()

    def summary(which: set[str]) -> dict:
        out = {}
        for name, exps in cuts.items():
            picked = [e for e, s in zip(exps, sources) if s in which and e.fve is not None]
            if picked:
                out[name] = {"mean_fve": round(statistics.mean(e.fve for e in picked), 4),
                             "mean_tokens": round(statistics.mean(e.tokens for e in picked), 1), "n": len(picked)}
        return out

    return {"layer": layer, "rows": len(sources), "rows_by_source": {s: sources.count(s) for s in set(sources)},
            "human": summary({"human"}), "model": summary({"model"}), "all": summary({"human", "model"}),
            "examples": [e.text for e in full[:: max(1, len(full) // 6)]][:6]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=12, help="documents per kind (people's text, the model's answers)")
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--out", default="bench-results/length.json")
    args = ap.parse_args()
    result = asyncio.run(measure(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rows", "rows_by_source", "all")}, indent=1))


if __name__ == "__main__":
    main()
