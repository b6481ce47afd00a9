"""Layer-K activations of the target at sampled positions, with what the targets need about them.

For every document the target sees exactly the token stream the server would give it (chat
transcripts: their stored ids; text: the tokenizer with its special tokens, so one BOS), cut to
``context_tokens``. One forward returns ``hidden_states[K+1]`` (the output of decoder block K,
before the next block's norm; index 0 is the embeddings) and, only at the sampled positions, the
target's own next-token distribution (lm_head on the final normed state).

Positions are sampled as the authors do: never the first ``min_position`` tokens (attention-sink
and near-empty-context rows explain poorly), never special tokens (chat-template scaffolding), and
never rows whose norm is ``outlier_factor`` times the document's median (the rare huge-norm rows).
Each sample keeps its document, split (held out by document, see ``corpus.is_heldout``; ``unseen``
for the genres and topics ``genres.py`` never trains on), genre and topic where known, position,
token, the last ``PREFIX`` token ids up to and including it (for chat replies, where the reply
starts among them), and the target's top-k predictions.

Output: ``part-NNNNN.safetensors`` (``vectors`` [n, d] fp32) + ``part-NNNNN.jsonl`` per
``part_size`` documents, then ``.complete``; an interrupted run resumes at the next part.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from nla_serve.train.corpus import Document, is_heldout

if TYPE_CHECKING:
    import torch

PREFIX = 96  # token ids kept per sample for building its explanation target


@dataclass
class ActivationSet:
    vectors: "torch.Tensor"  # [N, d] float32
    records: list[dict]

    def split(self, name: str) -> "ActivationSet":
        idx = [i for i, r in enumerate(self.records) if r["split"] == name]
        return ActivationSet(self.vectors[idx], [self.records[i] for i in idx])

    def __len__(self) -> int:
        return len(self.records)


def doc_ids(doc: Document, tokenizer, context_tokens: int) -> list[int]:
    ids = doc.ids if doc.ids is not None else tokenizer(doc.text, add_special_tokens=True)["input_ids"]
    return list(ids[:context_tokens])


def role_at(doc: Document, tokenizer, ids: list[int], pos: int) -> str | None:
    """Where a chat position sits: 'assistant' (the reply), 'user' (the user's message) or 'system'."""
    if doc.prompt_len is None:
        return None
    if pos >= doc.prompt_len:
        return "assistant"
    head = (doc.user or "")[:12]
    return "user" if head and head in tokenizer.decode(ids[:pos + 1]) else "system"


def sample_positions(ids: list[int], norms: list[float], special: set[int], *, k: int, min_position: int,
                     outlier_factor: float, rng: random.Random) -> list[int]:
    cands = [p for p in range(min_position, len(ids)) if ids[p] not in special]
    if not cands:
        return []
    med = sorted(norms[p] for p in cands)[len(cands) // 2]
    cands = [p for p in cands if norms[p] <= outlier_factor * med]
    return sorted(rng.sample(cands, min(k, len(cands))))


def collect(target: str, docs: Iterable[Document], layer: int, out_dir: Path, *, context_tokens: int = 256,
            positions_per_doc: int = 8, min_position: int = 32, heldout_fraction: float = 0.1, top_k: int = 5,
            outlier_factor: float = 8.0, batch_size: int = 4, part_size: int = 64, device: str = "cpu",
            seed: int = 0, progress: bool = True) -> ActivationSet:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / ".complete").is_file():
        return load_activations(out_dir)
    docs = list(docs)
    parts_done = len(list(out_dir.glob("part-*.jsonl")))
    tok = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(device).eval()
    n_layers = model.config.get_text_config().num_hidden_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the target's {n_layers} blocks (0..{n_layers - 1})")
    special = set(tok.all_special_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    decoder, lm_head = model.base_model, model.get_output_embeddings()
    bar = tqdm(total=len(docs), initial=min(len(docs), parts_done * part_size), desc="activations",
               disable=not progress)
    with torch.no_grad():
        for part in range(parts_done, (len(docs) + part_size - 1) // part_size):
            vecs, recs = [], []
            chunk = docs[part * part_size:(part + 1) * part_size]
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b:b + batch_size]
                ids = [doc_ids(d, tok, context_tokens) for d in batch]
                T = max(len(x) for x in ids)
                inp = torch.full((len(ids), T), pad, dtype=torch.long)  # [B, T], right-padded
                mask = torch.zeros((len(ids), T), dtype=torch.long)
                for r, x in enumerate(ids):
                    inp[r, :len(x)] = torch.tensor(x)
                    mask[r, :len(x)] = 1
                out = decoder(input_ids=inp.to(device), attention_mask=mask.to(device), output_hidden_states=True)
                resid = out.hidden_states[layer + 1].float()  # [B, T, d]: output of block K
                final = out.last_hidden_state  # [B, T, d], after the final norm
                for r, (doc, x) in enumerate(zip(batch, ids)):
                    norms = resid[r, :len(x)].norm(dim=-1).tolist()
                    rng = random.Random(f"{seed}:{doc.source}:{doc.id}")
                    pos = sample_positions(x, norms, special, k=positions_per_doc, min_position=min_position,
                                           outlier_factor=outlier_factor, rng=rng)
                    if not pos:
                        continue
                    probs = torch.softmax(lm_head(final[r, pos]).float(), dim=-1)  # [k, vocab]
                    top = torch.topk(probs, top_k, dim=-1)
                    split = "heldout" if is_heldout(doc.source, doc.id, heldout_fraction) else "train"
                    if doc.extra.get("unseen"):
                        split = "unseen"  # a held-out genre or topic (genres.py): never trained on
                    for j, p in enumerate(pos):
                        vecs.append(resid[r, p].cpu())
                        first = max(0, p + 1 - PREFIX)
                        recs.append({
                            "doc": doc.id, "source": doc.source, "split": split, "pos": p, "token": x[p],
                            "prefix_ids": x[first:p + 1], "role": role_at(doc, tok, x, p),
                            "reply_start": max(0, doc.prompt_len - first) if doc.prompt_len is not None
                            and p >= doc.prompt_len else None,
                            "user": (doc.user or "")[:200] or None, "norm": norms[p],
                            **{k: doc.extra[k] for k in ("genre", "topic") if k in doc.extra},
                            "top": [[int(i), round(float(q), 4)] for i, q in zip(top.indices[j], top.values[j])],
                        })
                bar.update(len(batch))
            d = model.config.get_text_config().hidden_size
            save_file({"vectors": torch.stack(vecs) if vecs else torch.zeros(0, d)},
                      str(out_dir / f"part-{part:05d}.safetensors"))
            (out_dir / f"part-{part:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bar.close()
    result = load_activations(out_dir, require_complete=False)
    (out_dir / ".complete").write_text(json.dumps({
        "target": str(target), "layer": layer, "n": len(result), "docs": len(docs),
        "heldout": sum(r["split"] == "heldout" for r in result.records)}))
    return result


def load_activations(out_dir: Path, *, require_complete: bool = True) -> ActivationSet:
    import torch
    from safetensors.torch import load_file

    if require_complete and not (out_dir / ".complete").is_file():
        raise FileNotFoundError(f"{out_dir} holds no complete activation set; run the collect stage")
    vecs, recs = [], []
    for f in sorted(out_dir.glob("part-*.jsonl")):
        recs += [json.loads(line) for line in f.read_text().splitlines()]
        vecs.append(load_file(str(f.with_suffix(".safetensors")))["vectors"])
    return ActivationSet(torch.cat(vecs) if vecs else torch.zeros(0, 0), recs)
