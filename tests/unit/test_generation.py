"""One request's life (generation/) on a scripted engine and worker: no HTTP, no model."""

from __future__ import annotations

import asyncio

import pytest

from nla_serve.admission import Admission
from nla_serve.config import ExplainDefaults
from nla_serve.events import ExplanationEvent, TokenEvent, UsageEvent
from nla_serve.explain.monitors import Monitoring, Rule
from nla_serve.explain.pipeline import ExplanationPipeline
from nla_serve.explain.policy import make_plan
from nla_serve.explain.worker import ExplanationWorker
from nla_serve.generation import PREDICTIONS_K, Generation, GenerationRequest
from nla_serve.types import SamplingOptions

from unit.fakes import Recorded, ScriptedEngine, ScriptedRuntime, Tracker, row_for

PROMPT = [1, 2, 3]


def plan_of(**explain):
    return make_plan(None if not explain else _options(explain), ExplainDefaults())


def _options(fields):
    from nla_serve.explain.options import ExplainOptions

    return ExplainOptions(**fields)


async def drive(engine, plan, *, runtime=None, rules=(), max_tokens=6, n=1, temperature=0.0, explain=True,
                consume=None):
    """Run one request to the end (or until ``consume`` stops reading); the events and the parts."""
    worker = None
    pipeline = None
    metrics = Recorded()
    if explain:
        worker = ExplanationWorker(runtime or ScriptedRuntime(), concurrency=4)
        await worker.start()
        pipeline = ExplanationPipeline(worker=worker, tokenizer=engine.tokenizer, monitoring=Monitoring(rules),
                                       metrics=metrics, plan=plan, request_id="req-1", model_name="m",
                                       arrived=None, layer=2)
    req = GenerationRequest("req-1", PROMPT, SamplingOptions(max_tokens=max_tokens, n=n, temperature=temperature), plan)
    tracker = Tracker()
    admission = Admission(4)
    ticket = admission.admit()
    gen = Generation(req, ticket, target=engine, metrics=metrics, tracker=tracker, pipeline=pipeline)
    events = []
    try:
        async for ev in gen.events():
            events.append(ev)
            if consume is not None and not consume(ev):
                break
    finally:
        ticket.release()
    await asyncio.sleep(0)
    parts = dict(worker=worker, tracker=tracker, metrics=metrics, gen=gen)
    if worker is not None:
        await worker.stop()
    return events, parts


def explained(events):
    return [e for e in events if isinstance(e, ExplanationEvent)]


def run(coro):
    return asyncio.run(coro)


def test_tokens_then_usage_and_the_default_plan_explains_last_prompt_token_and_spread_positions():
    engine = ScriptedEngine([10, 11, 12, 13, 14, 15])
    events, parts = run(drive(engine, plan_of()))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [t.token_ids[0] for t in tokens] == [10, 11, 12, 13, 14, 15]
    assert tokens[-1].finish_reason == "length"
    assert isinstance(events[-1], UsageEvent) and (events[-1].prompt_tokens, events[-1].completion_tokens) == (3, 6)
    items = explained(events)
    # auto, 4 explanations: the last prompt token (2) plus 3 spread over rows 3..7 (P+G-2 = 7)
    assert sorted(e.position for e in items) == [2, 3, 5, 7]
    for e in items:
        assert e.explanation.status == "ok" and e.layer == 2 and e.choice_index == 0
        assert e.explanation.text == f'the token at position {e.position} is "<{e.position}>"'
        ids = PROMPT + [10, 11, 12, 13, 14, 15]
        assert e.token_id == ids[e.position] and e.token == f"<{ids[e.position]}>"
        # the quote names token p's own id only when p is the prompt's last (ids 1..3 are the prompt)
        assert e.grounding is not None
    # the engine was asked to capture, and for enough logprobs to ground predictions
    (_, options, capture), = engine.requests
    assert capture and options.logprobs == PREDICTIONS_K
    # the client asked for no logprobs, so none reach it
    assert all(t.logprobs is None for t in tokens)
    assert parts["tracker"].live == {} and parts["metrics"].finished == ["length"]
    assert parts["worker"].in_flight() == {"requests": 0, "queued_jobs": 0} and not parts["worker"]._deadlines


def test_digest_is_of_the_exact_row():
    import hashlib

    engine = ScriptedEngine([10, 11, 12])
    events, _ = run(drive(engine, plan_of(positions=[1])))
    [e] = explained(events)
    assert e.activation_sha256 == hashlib.sha256(row_for(1).numpy().tobytes()).hexdigest()
    assert e.activation_dtype == "float32" and e.source == "prompt"


def test_the_last_generated_token_is_skipped_with_its_reason():
    engine = ScriptedEngine([10, 11, 12])
    events, _ = run(drive(engine, plan_of(positions=[5])))  # P+G-1 = 5: never fed through the model
    [e] = explained(events)
    assert e.explanation.status == "skipped" and "never fed" in e.explanation.reason
    assert e.token_id == 12 and e.position == 5


def test_without_explanations_nothing_is_captured_or_explained():
    engine = ScriptedEngine([10, 11])
    events, _ = run(drive(engine, plan_of(), explain=False))
    assert not explained(events)
    (_, options, capture), = engine.requests
    assert not capture and options.logprobs is None


def test_streamed_stride_positions_are_explained_while_the_choice_still_generates():
    engine = ScriptedEngine(list(range(10, 30)), step_delay=0.01)
    runtime = ScriptedRuntime()
    plan = plan_of().streamed(20)
    seen_before_end = []

    def consume(ev):
        if isinstance(ev, ExplanationEvent) and ev.explanation.status == "ok":
            seen_before_end.append(ev.position)
        if isinstance(ev, TokenEvent) and ev.finish_reason is not None:
            consume.done_at = len(seen_before_end)
        return True

    events, _ = run(drive(engine, plan, runtime=runtime, max_tokens=20, consume=consume))
    assert consume.done_at >= 2, "explanations of early positions arrive before the last token"
    assert sorted(e.position for e in explained(events)) == plan.select(3, 20)


def test_prompt_positions_are_explained_once_under_choice_zero():
    engine = ScriptedEngine([10, 11, 12])
    events, _ = run(drive(engine, plan_of(positions=[0, 1, 3]), n=2, temperature=1.0))
    by_choice = sorted((e.choice_index, e.position) for e in explained(events))
    assert by_choice == [(0, 0), (0, 1), (0, 3), (1, 3)]


def test_an_abort_rule_stops_the_generation_as_content_filter():
    engine = ScriptedEngine(list(range(10, 60)), step_delay=0.01)
    rules = (Rule(name="stop-it", action="abort", when={"text_matches": "position"}),)
    plan = plan_of(positions=[1]).streamed(50)
    events, _ = run(drive(engine, plan, rules=rules, max_tokens=50))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert tokens[-1].finish_reason == "content_filter"
    assert len(tokens) < 50 and engine.aborted
    [e] = explained(events)
    assert [m.rule for m in e.monitor_events] == ["stop-it"]


def test_a_client_gone_aborts_the_engine_and_resolves_the_jobs():
    engine = ScriptedEngine(list(range(10, 60)), step_delay=0.01)
    runtime = ScriptedRuntime(delay=5.0)
    plan = plan_of(positions=[0, 1, 2]).streamed(50)
    events, parts = run(drive(engine, plan, runtime=runtime, max_tokens=50,
                              consume=lambda ev: not (isinstance(ev, TokenEvent) and ev.token_ids[0] >= 15)))
    assert engine.aborted == ["req-1"]
    assert parts["tracker"].live == {} and parts["metrics"].finished == ["abort"]
    assert parts["worker"].in_flight() == {"requests": 0, "queued_jobs": 0} and not parts["worker"]._deadlines


def test_an_engine_failure_reaches_the_consumer():
    engine = ScriptedEngine([10, 11, 12, 13], fail_after=2)
    with pytest.raises(RuntimeError, match="scripted engine failed"):
        run(drive(engine, plan_of()))


def test_the_worker_answers_skipped_at_the_deadline_without_the_request_watching_the_clock():
    engine = ScriptedEngine([10, 11, 12])
    runtime = ScriptedRuntime(delay=30.0)
    plan = plan_of(positions=[0, 1], deadline_s=0.2)
    events, parts = run(asyncio.wait_for(drive(engine, plan, runtime=runtime), 10))
    items = explained(events)
    assert len(items) == 2
    for e in items:
        assert e.explanation.status == "skipped" and "deadline (0.2 s" in e.explanation.reason


def test_a_job_submitted_after_the_deadline_is_skipped_at_once():
    async def main():
        worker = ExplanationWorker(ScriptedRuntime(), concurrency=1)
        await worker.start()
        from nla_serve.explain.worker import ExplanationJob

        late = ExplanationJob("r", row_for(1), deadline=asyncio.get_running_loop().time() - 1, deadline_s=3)
        exp = await worker.submit(late)
        await worker.stop()
        return exp, worker

    exp, worker = run(main())
    assert exp.status == "skipped" and "deadline (3 s" in exp.reason
    assert worker.in_flight()["requests"] == 0 and not worker._deadlines


def test_prompt_positions_are_grounded_against_the_prompts_own_predictions():
    """Explaining a prompt position before the last asks the engine for the prompt's logprobs, and
    the quote of the model's top prediction there counts as predicted (checked, not unknown)."""
    engine = ScriptedEngine([10, 11, 12])
    runtime = ScriptedRuntime(text='expects "<500>" next')  # the scripted top prediction at position 0
    events, _ = run(drive(engine, plan_of(positions=[0, 2]), runtime=runtime))
    (_, options, _), = engine.requests
    assert options.prompt_logprobs == PREDICTIONS_K
    by_position = {e.position: e for e in explained(events)}
    g0 = by_position[0].grounding
    assert g0.checked_predictions and g0.score == 1.0, g0
    assert by_position[2].grounding.checked_predictions  # the last prompt token: from the first generated one


def test_the_default_plan_does_not_ask_for_prompt_logprobs():
    engine = ScriptedEngine([10, 11])
    run(drive(engine, plan_of()))
    (_, options, _), = engine.requests
    assert options.prompt_logprobs is None



def test_jobs_of_answers_still_generating_go_first():
    """Answers first: with one verbalizer place, the queued jobs of a request whose answer has
    ended wait until no request still generating has jobs queued (round-robin within each)."""
    async def main():
        runtime = ScriptedRuntime(delay=0.01)
        worker = ExplanationWorker(runtime, concurrency=1)
        await worker.start()
        from nla_serve.explain.worker import ExplanationJob

        order = []
        futures = []
        for rid in ("done", "done", "done", "live", "live"):
            fut = worker.submit(ExplanationJob(rid, row_for(len(futures))))
            fut.add_done_callback(lambda f, rid=rid: order.append(rid))
            futures.append(fut)
        worker.answered("done")  # its first job may already be running; the rest wait
        worker.answered("nobody")  # a request without pending jobs is not remembered
        await asyncio.gather(*futures)
        await worker.stop()
        return order, worker

    order, worker = run(main())
    assert order[-2:] == ["done", "done"] and order[:3].count("live") == 2, order  # a "done" job may have started
    assert not worker._answered and worker.in_flight() == {"requests": 0, "queued_jobs": 0}
