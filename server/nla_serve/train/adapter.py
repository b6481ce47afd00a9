"""`nla-serve adapter`: a small LoRA fine-tune of a target, saved in PEFT's layout for
``--lora-modules``: a real adapter to compare with its base (a batch report run on both, the
README's example), made on this machine in minutes.

The one style it teaches is ``kjv``: every user prompt (the trainer's varied chat prompts) is
answered with two consecutive King James verses, so the adapter changes what the model writes and,
if the NLA is any good, what its explanations say it represents. Loss is on the answer's tokens
only (the chat template's own rendering of the assistant turn, end-of-turn token included). The
LoRA layers are the trainer's own (``train/models.py``), on the attention's q, k, v and o.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from nla_serve.train.chats import chat_prompts
from nla_serve.train.corpus import package_dir
from nla_serve.train.models import adapter_state, add_lora, trainable

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def kjv_answers(n: int, seed: int) -> list[str]:
    """``n`` answers of two consecutive verses each (at most ~300 characters), in a seeded order."""
    verses = [json.loads(line)["text"] for line in
              (package_dir("bible") / "data" / "kjv.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        i = rng.randrange(len(verses) - 1)
        text = f"{verses[i]} {verses[i + 1]}"
        if len(text) <= 300:
            out.append(text)
    return out


def examples(tokenizer, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) pairs: labels are -100 over the prompt, the ids over the answer."""
    out = []
    for prompt, answer in zip(chat_prompts(n, seed), kjv_answers(n, seed)):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the prompt differently inside a whole conversation; "
                             "the answer's tokens cannot be told apart")
        x = tokenizer(head, add_special_tokens=False)["input_ids"]
        y = tokenizer(full[len(head):].rstrip("\n"), add_special_tokens=False)["input_ids"]
        out.append((x + y, [-100] * len(x) + y))
    return out


def batches(data: list[tuple[list[int], list[int]]], size: int, pad: int, rng: random.Random):
    while True:
        picked = rng.sample(data, size)
        width = max(len(x) for x, _ in picked)
        ids = torch.full((size, width), pad)
        labels = torch.full((size, width), -100)
        mask = torch.zeros((size, width), dtype=torch.long)
        for r, (x, y) in enumerate(picked):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        yield ids, labels, mask


def train_adapter(model_dir: str, out: Path, *, steps: int, rank: int, lr: float, batch_size: int, seed: int,
                  device: str = "cpu", log=print) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nla_serve.train.export import adapter_config

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    add_lora(model, rank, 2.0 * rank, targets=TARGETS)
    data = examples(tok, max(256, batch_size * 4), seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    opt = torch.optim.AdamW(trainable(model), lr=lr)
    stream = batches(data, batch_size, pad, random.Random(seed))
    t0, losses = time.monotonic(), []
    model.train()
    for step in range(1, steps + 1):
        ids, labels, mask = (t.to(device) for t in next(stream))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps:
            log(f"step {step}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"({time.monotonic() - t0:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model_dir, model, None), indent=2))
    summary = {"style": "kjv", "steps": steps, "rank": rank, "lr": lr, "batch_size": batch_size, "seed": seed,
               "first_loss": round(sum(losses[:10]) / len(losses[:10]), 4),
               "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
               "seconds": round(time.monotonic() - t0, 1)}
    (out / "nla_adapter_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_adapter(subparsers) -> None:
    p = subparsers.add_parser("adapter", help="a small LoRA fine-tune of a target (KJV-styled answers), "
                              "in PEFT's layout for --lora-modules")
    p.add_argument("--model", default=None, help="the target's folder (default: the embedded default model)")
    p.add_argument("--out", required=True, help="the adapter folder to write")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    model = args.model
    if model is None:
        from nla_serve.provision import default_model_dir

        model = str(default_model_dir())
    summary = train_adapter(model, Path(args.out), steps=args.steps, rank=args.rank, lr=args.lr,
                            batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(json.dumps(summary))
    return 0
