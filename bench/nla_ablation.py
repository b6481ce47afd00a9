"""What each paragraph of an NLA's explanations is worth to its reconstructor, on held-out rows.

For ``--n`` rows of a training work dir's split (``heldout`` or ``unseen``), the AV explains each
vector greedily; the AR then reconstructs the vector from the whole explanation and from the
explanation with one paragraph dropped at a time. The drop in FVE is what that paragraph carries;
the grounding share says how much of what it quotes is true. One JSON on stdout.

    .venv/bin/python bench/nla_ablation.py --av server/nla_serve/default_nla/av \\
        --ar server/nla_serve/default_nla/ar --target ~/.cache/nla-serve/smollm2-135m-instruct \\
        --work WORK --split unseen --n 200
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--av", required=True, type=Path)
    ap.add_argument("--ar", required=True, type=Path)
    ap.add_argument("--target", required=True, help="the LoRA base (the target model folder)")
    ap.add_argument("--work", required=True, type=Path, help="training work dir with activations/")
    ap.add_argument("--split", default="unseen", choices=["heldout", "unseen"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from nla_serve.nla.checkpoint import load_nla
    from nla_serve.nla.lora import resolve_folder
    from nla_serve.nla.reconstructor import Reconstructor, score_vectors
    from nla_serve.train.activations import load_activations
    from nla_serve.train.evaluate import grounding_of, stratified, verbalize

    acts = load_activations(args.work / "activations").split(args.split)
    rows = stratified(acts.records, args.n, 0)
    vectors, records = acts.vectors[rows], [acts.records[i] for i in rows]
    av, ar = resolve_folder(args.av, base=args.target), resolve_folder(args.ar, base=args.target)
    ckpt = load_nla(av, ar)
    bodies = [o[0] for o in verbalize(av, ckpt, vectors, engine="batch", device="cpu", max_tokens=args.max_tokens)]
    tok = AutoTokenizer.from_pretrained(av)
    rec = Reconstructor(ckpt.ar, device="cpu", dtype="float32")

    def fve(texts: list[str]) -> float:
        scores = score_vectors(rec.reconstruct(texts), vectors, ckpt.ar.mse_scale, ckpt.fve_baseline)
        return round(statistics.fmean(s.fve for s in scores), 4)

    paragraphs = [b.split("\n\n") for b in bodies]
    width = max(len(p) for p in paragraphs)
    out = {"split": args.split, "n": len(bodies), "av": str(args.av), "fve_whole": fve(bodies), "without": {}}
    for k in range(width):
        out["without"][f"paragraph_{k + 1}"] = fve(["\n\n".join(p[:k] + p[k + 1:]) or " " for p in paragraphs])
    grounds = [grounding_of(tok, r, b) for r, b in zip(records, bodies)]
    quotes = sum(g.quotes for g in grounds)
    out["quotes_grounded"] = round(sum(len(g.found) + len(g.predicted) for g in grounds) / quotes, 4) if quotes else None
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
