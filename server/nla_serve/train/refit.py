"""Refit of the AR on the final AV's own explanations (stage ``refit``).

The supervised AR learnt to read the *teacher* targets, which quote the context and list its topic
words exactly. The trained AV gets the kind of text and the final token right but guesses the
quoted words and topic words from what is frequent in its training text, and an AR trained on exact
targets trusts those guesses. At inference the AR only ever reads what the AV writes, so this stage
closes the gap the paper closes by training the AR during RL: the final AV writes greedy
explanations (the inference recipe) for training rows, drawn evenly across text sources, and the AR
continues supervised training on (its explanation, the vector). Only training rows are used; the
held-out split stays unseen by both models.

Explanations are appended to ``WORK/refit.jsonl`` per batch, keyed by activation row, so an
interrupted run resumes without writing them again and a larger ``refit_rows`` writes only the
new rows; the AR's state is ``WORK/refit.pt`` (see ``sft.train_ar``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from nla_serve.train.generation import generate
from nla_serve.train.models import lora_merged


def explain_rows(av, tokenizer, prompt_ids: list[int], at: int, scale: float, rows: list[int], vectors: torch.Tensor,
                 path: Path, *, eos_ids: set[int], max_new_tokens: int, batch: int, progress: bool = True) -> list[str]:
    """Greedy explanation bodies for activation rows ``rows`` (``vectors[j]`` is row ``rows[j]``),
    appended to ``path`` (jsonl, keyed by row) batch by batch. Rows already in the file are read back,
    not written again, so a run resumes, and a run asking for more or other rows writes only those."""
    done: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[int(rec["i"])] = rec
    todo = [j for j, i in enumerate(rows) if i not in done]
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="refit: explain", disable=not progress)
    av.eval()
    with torch.no_grad(), lora_merged(av):
        for start in range(0, len(todo), batch):
            part = todo[start:start + batch]
            samples = generate(av, tokenizer, prompt_ids, at, scale, vectors[part], max_new_tokens=max_new_tokens,
                               eos_ids=eos_ids, temperature=0.0, batch_size=len(part))
            recs = [{"i": rows[j], "body": s.body, "closed": s.closed, "tokens": len(s.token_ids)}
                    for j, s in zip(part, samples)]
            with open(path, "a") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
            done.update((r["i"], r) for r in recs)
            bar.update(len(recs))
    bar.close()
    return [done[i]["body"] for i in rows]
