"""``TextWriter``: the target writes text for the corpus (chat transcripts, the genre grid).

Two engines, one interface (``generate(prompt_ids_list, max_new_tokens, batch_seed) -> new ids``),
both sampling at temperature 0.7, top-p 0.9:

- ``vllm`` (``auto`` picks it when vLLM is installed): continuous batching over hundreds of
  prompts at once, several times faster than batched transformers on a CPU. vLLM runs in its
  compute dtype; that only changes which text gets written, never an activation:
  activations are collected later by a transformers fp32 forward over these exact ids. The seed
  is the engine's, not per request: a per-request seed crashes vLLM's CPU sampler when chunked
  prefill splits that prompt (../shared/VLLM.md), so a rerun writes the same text only with the
  same batches.
- ``transformers``: batched generation with left padding (``generation.generate_ids``), seeded per
  batch, exactly reproducible; what tests use on tiny models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class TextWriter:
    generate: Callable[[list[list[int]], int, int], list[list[int]]]
    batch_size: int  # prompts to hand over at once
    engine: str
    handle: Any = None

    @classmethod
    def open(cls, target: str, tokenizer, *, device: str = "cpu", engine: str = "auto", seed: int = 0,
             batch_size: int = 16) -> "TextWriter":
        if engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"unknown text-writing engine {engine!r}; expected auto, vllm or transformers")
        if engine != "transformers" and _vllm_installed(required=engine == "vllm"):
            return _vllm_writer(target, seed)
        return _transformers_writer(target, tokenizer, device, batch_size)

    def close(self) -> None:
        """Stop the engine now: a vLLM engine's processes would otherwise outlive the corpus stage
        (and, orphaned, the training run) and take CPU from every later stage."""
        handle, self.handle = self.handle, None
        if handle is not None and self.engine == "vllm":
            handle.llm_engine.engine_core.shutdown()
        self.generate = _closed


def write_answers(target: str, out: Path, prompts: list[str], make_doc: Callable, *, max_new_tokens: int,
                  seed: int, device: str, engine: str, batch_size: int, progress: bool, desc: str,
                  writer: TextWriter | None = None) -> list:
    """The target answers ``prompts`` (user messages, through its chat template); each answer
    becomes ``make_doc(i, prompt_ids, answer_ids, answer_text)`` (a ``corpus.Document``), appended
    to ``out`` (jsonl) batch by batch, so an interrupted run resumes at the first missing one.
    A ``writer`` handed in (the corpus stage shares one engine) stays open. -> all documents."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from nla_serve.model_folder import chat_ids
    from nla_serve.train.corpus import Document

    n = len(prompts)
    done = [Document.from_json(line) for line in out.read_text().splitlines()] if out.is_file() else []
    if len(done) >= n:
        return done[:n]
    tok = AutoTokenizer.from_pretrained(target)
    own = writer is None
    if own:
        writer = TextWriter.open(target, tok, device=device, engine=engine, seed=seed, batch_size=batch_size)
    bar = tqdm(total=n, initial=len(done), desc=desc, disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(len(done), n, writer.batch_size):
            ids = [chat_ids(tok, p) for p in prompts[start:start + writer.batch_size]]
            new = writer.generate(ids, max_new_tokens, seed * 100_003 + start)
            for r, (x, g) in enumerate(zip(ids, new)):
                doc = make_doc(start + r, x, g, tok.decode(g, skip_special_tokens=True))
                f.write(doc.to_json() + "\n")
                done.append(doc)
            f.flush()
            bar.update(len(ids))
    bar.close()
    if own:
        writer.close()
    return done[:n]


def _closed(*_args, **_kwargs):
    raise RuntimeError("this TextWriter is closed")


def _vllm_installed(required: bool) -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        if required:
            raise
        return False
    return True


def _vllm_writer(target: str, seed: int) -> TextWriter:
    import os

    cpus = sorted(os.sched_getaffinity(0))
    # vLLM's CPU "auto" binding keeps one core back for its front end: on a 2-core machine the
    # writer then decodes on one thread; the front end is idle while a batch runs, so use them all
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    from vllm import LLM, SamplingParams

    # fp32: measured faster than bf16 on CPUs without native bf16 (docs/benchmarks.md, training)
    llm = LLM(model=str(target), dtype="float32", max_model_len=1024, seed=seed, kv_cache_memory_bytes=2 << 30,
              enforce_eager=True)

    def generate(prompts: list[list[int]], max_new_tokens: int, batch_seed: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_new_tokens)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return TextWriter(generate, batch_size=256, engine="vllm", handle=llm)


def _transformers_writer(target: str, tokenizer, device: str, batch_size: int) -> TextWriter:
    import torch
    from transformers import AutoModelForCausalLM

    from nla_serve.model_folder import eos_ids_of
    from nla_serve.train.generation import generate_ids

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).to(device).eval()
    eos = eos_ids_of(target, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    def generate(prompts: list[list[int]], max_new_tokens: int, batch_seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(batch_seed)
        return generate_ids(model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad, temperature=0.7,
                            top_p=0.9, generator=gen)

    return TextWriter(generate, batch_size=batch_size, engine="transformers", handle=model)
