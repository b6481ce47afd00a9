"""Steering on both engines, against each other and a hand-written reference: the same steered
greedy tokens on the transformers engine and on vLLM (compiled, chunked prefill, prefix cache on),
strength 0 bit for bit the unsteered answer, rows read before the steering, concurrent requests
with different steering unaffected by each other, a steered prompt never serving its cached
blocks to an unsteered one, and n > 1 steered in every choice."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import vllm_required
from nla_serve.config import EngineSettings
from nla_serve.engines import make_engine
from nla_serve.errors import ClientError
from nla_serve.steering.hf_hook import decoder_layers
from nla_serve.steering.intervention import Intervention, PositionRule, steer
from nla_serve.types import Prompt, SamplingOptions

PROMPT = list(range(5, 45))  # 40 tokens: chunked by the vLLM engine's 32-token step budget


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def engine(request, tiny, loop):
    if request.param == "vllm":
        vllm_required()
    e = make_engine(EngineSettings(model=str(tiny.target), kind=request.param, dtype="float32", device="cpu",
                                   capture_layer=tiny.layer, max_model_len=512, max_num_batched_tokens=32,
                                   max_num_seqs=16, kv_cache_gib=0.25, enable_prefix_caching=True,
                                   enforce_eager=False))
    loop.run(e.start(), timeout=600)
    yield e
    loop.run(e.shutdown(), timeout=120)


@pytest.fixture(scope="module")
def reference(tiny):
    return AutoModelForCausalLM.from_pretrained(str(tiny.target), dtype=torch.float32).eval()


def unit(d: int, seed: int = 0) -> tuple[float, ...]:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return tuple((v / v.norm()).tolist())


def steering(engine, strength: float, rule: str = "all", seed: int = 0, prompt: list[int] = PROMPT) -> Intervention:
    return Intervention(engine.settings.capture_layer, (unit(engine.hidden_size, seed),), (strength,),
                        (PositionRule(rule),), len(prompt), max_ratio=8.0)


async def generate(engine, iv, rid, n_tokens=10, n=1, prompt: list[int] = PROMPT):
    # n > 1 samples with top_k 1: the argmax, as greedy, which refuses n > 1 (n identical choices)
    options = SamplingOptions(max_tokens=n_tokens, temperature=0.0 if n == 1 else 1.0, top_k=1 if n > 1 else 0, n=n,
                              ignore_eos=True)  # the hand-written reference never stops early either
    toks: dict[int, list[int]] = {}
    rows: list[torch.Tensor] = []
    async for out in engine.generate(Prompt(prompt), options, rid, intervention=iv):
        toks.setdefault(out.index, []).extend(out.token_ids)
        if out.captured is not None and out.index == 0:
            rows.append(out.captured.rows)
    return [toks[i] for i in sorted(toks)], torch.cat(rows)


def hand_greedy(model, layer: int, iv: Intervention | None, n_tokens: int, prompt: list[int] = PROMPT) -> list[int]:
    """Greedy decoding with no cache: every forward re-runs the whole sequence, steering each fed
    position with the addition rule at block K+1's input."""
    ids = list(prompt)

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        u = iv.rows(list(range(h.shape[-2])))[None]
        h2 = steer(h, u)
        return ((h2, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h2})

    handle = decoder_layers(model)[layer + 1].register_forward_pre_hook(hook, with_kwargs=True) if iv else None
    try:
        with torch.inference_mode():
            for _ in range(n_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        if handle is not None:
            handle.remove()
    return ids[len(prompt):]


def test_steered_greedy_tokens_match_the_reference(engine, reference, loop):
    iv = steering(engine, 3.0)
    got = loop.run(generate(engine, iv, "steer-ref"))[0][0]
    assert got == hand_greedy(reference, engine.settings.capture_layer, iv, 10)
    assert got != hand_greedy(reference, engine.settings.capture_layer, None, 10)  # it did something
    gen_only = steering(engine, 3.0, "generated")
    assert loop.run(generate(engine, gen_only, "steer-gen"))[0][0] == \
        hand_greedy(reference, engine.settings.capture_layer, gen_only, 10)


def test_strength_zero_is_bit_identical_and_rows_are_read_before_steering(engine, loop):
    plain_toks, plain_rows = loop.run(generate(engine, None, "plain"))
    zero_toks, zero_rows = loop.run(generate(engine, steering(engine, 0.0, seed=5), "zero"))
    assert zero_toks == plain_toks and torch.equal(zero_rows, plain_rows)
    _, steered_rows = loop.run(generate(engine, steering(engine, 3.0), "steered"))
    P = len(PROMPT)  # the prompt's rows are the same activations: read before the vector is added
    assert torch.allclose(steered_rows[:P], plain_rows[:P], atol=1e-5)


def test_concurrent_requests_do_not_steer_each_other(engine, loop):
    up, down = steering(engine, 3.0), steering(engine, -2.0)
    alone = [loop.run(generate(engine, iv, f"alone-{i}"))[0][0] for i, iv in enumerate((up, None, down))]

    async def together():
        return await asyncio.gather(*(generate(engine, iv, f"mixed-{i}") for i, iv in enumerate((up, None, down))))

    assert [r[0][0] for r in loop.run(together())] == alone
    assert len(set(map(tuple, alone))) == 3


def test_steered_and_unsteered_requests_never_share_cached_blocks(engine, reference, loop):
    """A prompt of several KV blocks (vLLM caches whole blocks, 128 tokens on CPU), plain, then
    steered, then plain again: each equals its no-cache reference. Without the cache salt the
    steered request reuses the plain one's blocks and comes back part-steered (seen: this test
    fails on vLLM with the salt removed)."""
    layer = engine.settings.capture_layer
    long = [5 + (i * 7) % 300 for i in range(300)]
    iv = steering(engine, 3.0, "prompt", seed=9, prompt=long)
    plain = hand_greedy(reference, layer, None, 10, long)
    assert loop.run(generate(engine, None, "cache-plain", prompt=long))[0][0] == plain
    assert loop.run(generate(engine, iv, "cache-steered", prompt=long))[0][0] == hand_greedy(reference, layer, iv, 10, long)
    stats = getattr(engine, "stats", None)  # the vLLM engine's (the reference engine caches nothing)
    hits = stats.prefix_cache_hits if stats is not None else 0
    assert loop.run(generate(engine, None, "cache-after", prompt=long))[0][0] == plain
    if stats is not None:  # the plain prompt's own blocks were reused
        assert stats.prefix_cache_hits > hits


def test_every_choice_is_steered(engine, loop):
    iv = steering(engine, 3.0)
    steered = loop.run(generate(engine, iv, "n1"))[0][0]
    assert loop.run(generate(engine, iv, "n2", n=2))[0] == [steered, steered]


def test_wrong_layer_or_width_is_refused(engine, loop):
    iv = steering(engine, 1.0)
    wrong_layer = Intervention(iv.layer + 1, iv.directions, iv.strengths, iv.rules, iv.prompt_len, iv.max_ratio)
    narrow = Intervention(iv.layer, (iv.directions[0][:-1],), iv.strengths, iv.rules, iv.prompt_len, iv.max_ratio)
    for bad, words in ((wrong_layer, "NLA layer"), (narrow, "residual stream")):
        with pytest.raises(ClientError, match=words):
            loop.run(generate(engine, bad, "bad"))


def test_preempted_steered_requests_stay_exact(tiny, reference, loop):
    """A KV cache for about two requests, four steered ones at once: vLLM preempts and recomputes
    them, and each still equals its no-cache steered reference (its rows are steered again)."""
    vllm_required()
    engine = make_engine(EngineSettings(model=str(tiny.target), kind="vllm", dtype="float32", device="cpu",
                                        capture_layer=tiny.layer, max_model_len=256, max_num_seqs=4,
                                        kv_cache_gib=1 / 1024, enforce_eager=True))  # ~512 tokens of KV
    loop.run(engine.start(), timeout=600)
    try:
        ivs = [steering(engine, s, seed=i) for i, s in enumerate((3.0, -2.0, 1.5, 0.0))]

        async def all_at_once():
            return await asyncio.gather(*(generate(engine, iv, f"preempt-{i}", n_tokens=150)
                                          for i, iv in enumerate(ivs)))

        results = loop.run(all_at_once())
        assert engine.stats.preemptions > 0, "the KV budget did not force a preemption"
        for iv, got in zip(ivs, results):
            assert got[0][0] == hand_greedy(reference, tiny.layer, iv, 150)
    finally:
        loop.run(engine.shutdown(), timeout=120)
