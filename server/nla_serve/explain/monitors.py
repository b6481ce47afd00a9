"""Monitors: the operator's rules, applied to every explanation as it is produced.

A rules file (``--monitors FILE``, YAML: a list of rules, or ``{rules: [...]}``)::

    - name: being-tested
      when: {text_matches: "being (tested|evaluated)|an? (test|evaluation)"}
      positions: generated          # generated | prompt | all (default all)
      action: flag                  # flag (default) | webhook (with url) | abort
    - name: low-fidelity
      when: {fve_below: 0.0}
      action: webhook
      url: http://alerts.internal:9000/nla
    - name: supported-explosives
      when: {text_matches: "explosive", supported: true}   # inside a claim the pair supports
      window: {matches: 2, of: 4}   # 2 of the choice's last 4 explained positions
    - name: stop-on-deception
      when: {text_matches: "deceiv|lying to the user"}
      action: abort                 # stop the answer (finish_reason content_filter)

A rule matches when every condition it gives holds: ``text_matches`` (a regular expression,
case-insensitive, searched in the explanation text), ``fve_below`` / ``fve_above`` (an explanation
without an FVE matches neither), ``grounding_below`` (an explanation that quotes nothing has no
grounding score and does not match it). Matches are reported on the explanation item
(``monitors: [rule names]``) and as ``monitor_events`` in the response, the stream and the audit
record; a ``webhook`` rule also POSTs the event (``webhooks.py``), never delaying the answer.

Claims. ``supported`` and ``min_support`` read the explanation's claims (``explain/claims.py``,
``nla/support.py``): the rule matches when one claim satisfies all of them together with
``text_matches``, which is then searched in that claim's text rather than the whole explanation.
``supported: true`` wants the claim's verdict "supported"; ``supported: false`` wants a known
verdict against it ("unsupported" or "contradicted"); a null verdict (no thresholds for the pair
yet) is no verdict known and matches neither. ``min_support: x`` wants the claim's support (FVE it
adds) to be at least x; a null support matches no minimum. An explanation without claims cannot
match such a rule. Claims cost the reconstructor one sequence per claim, so they are scored only
when asked, except that a loaded rule that reads them turns them on for every explanation
(``ServerSettings`` sets ``ExplainDefaults.claims_required``; a request cannot turn them off).

Windows. One explained token is weak evidence: a phrase in one explanation is often noise, in
several neighbouring ones a pattern. With ``window: {matches: k, of: n}`` the rule fires on an
explanation whose own conditions hold when at least k of the last n explained positions of the same
choice (this one included) held them. Precisely, per request, choice and rule: the *explained
positions* are those the rule applies to (``positions``) whose explanations have text (skipped and
failed ones are not explained), in position order; a *window* is n consecutive explained positions
(all of them while there are fewer than n). When an explanation resolves and its conditions hold,
the rule fires on it if a window holding its position, among the positions resolved so far, has k
matches; the event's ``window`` lists that window's positions and matched ones. Explanations mostly
resolve in position order, and then the window is the n explained positions ending here. One that
resolves out of order (concurrent jobs) still completes every window with k matches in the final
order (the last of its matches to resolve fires), though an unmatched position resolving later may
split a window that already fired. Raw vectors (``/v1/explanations``) are windowed by index. State
is kept for the ``WINDOWS`` most recently active (request, choice, rule) triples.

Base rates. At start each rule with ``text_matches`` is applied to explanations of other
activations, the default NLA's held-out eval examples (``default_nla/eval.json``) in a fixed
shuffled order, windows included: the share it fires on is how often it fires on explanations that
have nothing to do with the activation at hand. Conditions on scores are taken to hold there, so
the share is an upper bound. It is logged (a warning from 20%) and exported as the gauge
``nla_monitor_shuffled_match_rate{rule}``; a rule without ``text_matches`` is not estimated.

``abort`` stops the generation when a rule matches an explanation that resolves while the answer
is still being generated (explanations start as soon as their rows exist, ``generation.py``): the
choice ends with ``finish_reason: "content_filter"`` (with n > 1, every choice of the request
still running does: the engines abort a request as a whole). An explanation that resolves after
its choice has finished has nothing left to stop; its event is reported like a flag. Rules are
validated when the server starts; errors name the rule and the field.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
import re
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from nla_serve.explain.claims import split_claims

log = logging.getLogger("nla_serve.monitors")

WINDOWS = 4096  # (request, choice, rule) windows kept; the least recently used go first
MAX_WINDOW = 64  # a window's n: the state of one is at most the choice's explained positions
REFERENCE = Path(__file__).resolve().parents[1] / "default_nla" / "eval.json"
WARN_RATE = 0.2  # a rule matching this share of unrelated explanations says little about one
AGAINST = ("unsupported", "contradicted")  # the verdicts ``supported: false`` wants


class MonitorConfigError(ValueError):
    """The rules file is wrong; the message names the file, the rule and the field."""


class When(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text_matches: str | None = Field(default=None, min_length=1, max_length=2000)
    fve_below: float | None = Field(default=None, allow_inf_nan=False)
    fve_above: float | None = Field(default=None, allow_inf_nan=False)
    grounding_below: float | None = Field(default=None, ge=0, le=1)
    supported: StrictBool | None = None  # a claim with verdict "supported" (false: "unsupported"/"contradicted")
    min_support: float | None = Field(default=None, ge=-10, le=10, allow_inf_nan=False)  # a claim's support >= this

    @field_validator("text_matches")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v, re.IGNORECASE)
            except re.error as e:
                raise ValueError(f"not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _some(self):
        if all(getattr(self, k) is None for k in type(self).model_fields):
            raise ValueError("give at least one of text_matches, fve_below, fve_above, grounding_below, supported, "
                             "min_support")
        return self

    @property
    def reads_claims(self) -> bool:
        """Whether the conditions are about claims (then ``text_matches`` is searched in a claim)."""
        return self.supported is not None or self.min_support is not None

    def holds(self, text: str | None, fve: float | None, grounding: float | None, claims: list[dict] | None) -> bool:
        """Every condition holds (unknown numbers and missing claims hold none)."""
        if self.fve_below is not None and (fve is None or not fve < self.fve_below):
            return False
        if self.fve_above is not None and (fve is None or not fve > self.fve_above):
            return False
        if self.grounding_below is not None and (grounding is None or not grounding < self.grounding_below):
            return False
        if self.reads_claims:
            return any(self._claim_holds(c) for c in claims or ())
        return self.text_matches is None or (text is not None and bool(_compiled(self.text_matches).search(text)))

    def _claim_holds(self, claim: dict) -> bool:
        text, verdict, support = claim.get("text"), claim.get("verdict"), claim.get("support")
        if self.text_matches is not None and (not text or not _compiled(self.text_matches).search(text)):
            return False
        if self.supported is True and verdict != "supported":
            return False
        if self.supported is False and verdict not in AGAINST:
            return False
        if self.min_support is not None and (not isinstance(support, (int, float)) or isinstance(support, bool)
                                             or not support >= self.min_support):
            return False
        return True

    def text_holds(self, text: str) -> bool:
        """``text_matches`` alone, where the rule searches it (a claim of ``text``, or all of it):
        the base rate's test, the scores taken to hold (``shuffled_match_rate``)."""
        pattern = _compiled(self.text_matches)
        if self.reads_claims:
            return any(pattern.search(c.text) for c in split_claims(text))
        return bool(pattern.search(text))


class Window(BaseModel):
    """``{matches: k, of: n}``: at least k of the last n explained positions of the choice."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    matches: int = Field(ge=1, le=MAX_WINDOW)
    of: int = Field(ge=1, le=MAX_WINDOW)

    @model_validator(mode="after")
    def _fits(self):
        if self.matches > self.of:
            raise ValueError(f"matches ({self.matches}) is more than of ({self.of}): the window could never fire")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    when: When
    positions: Literal["generated", "prompt", "all"] = "all"
    action: Literal["flag", "webhook", "abort"] = "flag"
    url: str | None = Field(default=None, pattern=r"^https?://\S+$")
    window: Window | None = None

    @model_validator(mode="after")
    def _action(self):
        if self.action == "webhook" and not self.url:
            raise ValueError("webhook needs a url")
        if self.action != "webhook" and self.url:
            raise ValueError(f"url is only for action webhook, not {self.action}")
        return self

    @property
    def needs_claims(self) -> bool:
        """Whether this rule can only match explanations whose claims were scored."""
        return self.when.reads_claims

    def applies_to(self, source: str) -> bool:
        """Whether an explanation of a ``source`` position is this rule's business at all."""
        if self.positions == "generated":
            return source == "completion"
        return self.positions != "prompt" or source == "prompt"

    def matches(self, text: str | None, fve: float | None, grounding: float | None, source: str,
                claims: list[dict] | None = None) -> bool:
        """This one explanation meets the rule's conditions (its window aside)."""
        return self.applies_to(source) and self.when.holds(text, fve, grounding, claims)


_PATTERNS: dict[str, re.Pattern] = {}


def _compiled(pattern: str) -> re.Pattern:
    got = _PATTERNS.get(pattern)
    if got is None:
        got = _PATTERNS[pattern] = re.compile(pattern, re.IGNORECASE)
    return got


def parse_rules(data, source: str = "the monitors file") -> tuple[Rule, ...]:
    """Validate the YAML's data: a list of rules or ``{rules: [...]}``."""
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    if not isinstance(data, list):
        raise MonitorConfigError(f"{source}: expected a list of rules (or 'rules: [...]')")
    rules, seen = [], set()
    for i, raw in enumerate(data):
        label = f"rule #{i + 1}"
        if isinstance(raw, dict) and isinstance(raw.get("name"), str):
            label += f" ({raw['name']!r})"
        if not isinstance(raw, dict):
            raise MonitorConfigError(f"{source}: {label}: expected a mapping with name, when and action")
        try:
            rule = Rule.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            # the rule-wide checks are all about the action and its url
            where = ".".join(str(x) for x in err["loc"]) or "action"
            msg = err["msg"].removeprefix("Value error, ")
            raise MonitorConfigError(f"{source}: {label}: {where}: {msg}") from None
        if rule.name in seen:
            raise MonitorConfigError(f"{source}: {label}: name {rule.name!r} is used by an earlier rule")
        seen.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def load_rules(path: str | Path) -> tuple[Rule, ...]:
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MonitorConfigError(f"--monitors {str(p)!r} could not be read ({type(e).__name__}: {e})") from None
    return parse_rules(data, f"--monitors {str(p)!r}")


@dataclass(frozen=True)
class MonitorEvent:
    """One rule matching one explanation (``window``: for a windowed rule, the window that fired)."""

    rule: str
    action: str
    source: str
    choice_index: int | None
    token_index: int | None
    token: str | None
    explanation: str | None
    fve: float | None
    grounding: float | None
    time: float
    window: dict | None = None

    def as_dict(self) -> dict:
        out = {"rule": self.rule, "action": self.action, "source": self.source, "choice_index": self.choice_index,
               "token_index": self.token_index, "token": self.token, "explanation": self.explanation,
               "fve": self.fve, "grounding": self.grounding, "time": self.time}
        if self.window is not None:  # only windowed rules say it: other events keep their shape
            out["window"] = self.window
        return out


class WindowState:
    """One windowed rule over one choice: its explained positions so far, and which matched."""

    def __init__(self, window: Window):
        self.k, self.n = window.matches, window.of
        self.positions: list[int] = []
        self.matched: set[int] = set()

    def add(self, position: int, hit: bool) -> dict | None:
        """Record an explained position; the window that fires on it (see the module's
        docstring), as ``{"positions", "matched"}``, or None."""
        i = bisect.bisect_left(self.positions, position)
        if i == len(self.positions) or self.positions[i] != position:
            self.positions.insert(i, position)
        if hit:
            self.matched.add(position)
        else:
            return None
        pos, n = self.positions, self.n
        # every window of n consecutive explained positions that holds this one, the latest first
        for start in range(min(i, max(0, len(pos) - n)), max(0, i - n + 1) - 1, -1):
            span = pos[start:start + n]
            got = [p for p in span if p in self.matched]
            if len(got) >= self.k:
                return {"positions": span, "matched": got}
        return None


@lru_cache(maxsize=4)
def reference_texts(path: Path = REFERENCE) -> tuple[str, ...]:
    """Explanations of other activations, in a fixed shuffled order: the default NLA's held-out
    eval examples (its report keeps a sample of them, with the unseen-genre set's)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("monitor base rates: %s could not be read (%s)", path, e)
        return ()
    examples = list(report.get("examples") or []) + list((report.get("unseen") or {}).get("examples") or [])
    texts = [e["explanation"] for e in examples if isinstance(e, dict) and isinstance(e.get("explanation"), str)]
    random.Random(0).shuffle(texts)  # neighbours come from unrelated documents, as in a shuffled pairing
    return tuple(texts)


def shuffled_match_rate(rule: Rule, texts: tuple[str, ...]) -> float | None:
    """The share of ``texts`` (explanations of other activations, in order) the rule fires on,
    its window over them included; its conditions on scores taken to hold (an upper bound). None
    without ``text_matches`` (nothing to test on text alone) or without texts."""
    if rule.when.text_matches is None or not texts:
        return None
    hits = [rule.when.text_holds(t) for t in texts]
    if rule.window is None:
        return sum(hits) / len(texts)
    state = WindowState(rule.window)
    return sum(state.add(i, hit) is not None for i, hit in enumerate(hits)) / len(texts)


_GAUGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rate_gauge(metrics):
    """The base-rate gauge on the server's registry (once per registry; None without one)."""
    registry = getattr(metrics, "registry", None)
    if registry is None:
        return None
    gauge = _GAUGES.get(registry)
    if gauge is None:
        from prometheus_client import Gauge

        gauge = _GAUGES[registry] = Gauge(
            "nla_monitor_shuffled_match_rate", "Share of explanations of other activations (the default NLA's eval "
            "examples) each monitor rule fires on, windows included; an upper bound (conditions on scores taken to "
            "hold); rules without text_matches are not estimated", ["model_name", "rule"], registry=registry)
    return gauge


class Monitoring:
    """The server's rules, with what acting on them needs: metrics, the webhook sender, and the
    windows of windowed rules. ``reference``: the texts base rates are measured on."""

    def __init__(self, rules: tuple[Rule, ...] = (), *, metrics=None, webhooks=None,
                 reference: tuple[str, ...] | None = None):
        self.rules = rules
        self.metrics = metrics
        self.webhooks = webhooks
        self._windows: OrderedDict[tuple, WindowState] = OrderedDict()
        self.base_rates: dict[str, float | None] = {}
        if rules:
            self._report_base_rates(reference_texts() if reference is None else reference)
            reading = [r.name for r in rules if r.needs_claims]
            if reading:
                log.info("monitor rules %s read claim support: every explanation's claims are scored (one more "
                         "reconstructor sequence per claim)", ", ".join(reading))

    def _report_base_rates(self, texts: tuple[str, ...]) -> None:
        gauge = _rate_gauge(self.metrics)
        for rule in self.rules:
            rate = self.base_rates[rule.name] = shuffled_match_rate(rule, texts)
            if rate is None:
                log.info("monitor rule %r: base rate not estimated (%s)", rule.name,
                         "no text_matches" if texts else "no reference explanations")
                continue
            if gauge is not None:
                gauge.labels(self.metrics.model_name, rule.name).set(rate)
            say = log.warning if rate >= WARN_RATE else log.info
            say("monitor rule %r fires on %.1f%% of %d explanations of other activations (the default NLA's eval "
                "examples, shuffled%s; an upper bound)%s", rule.name, 100 * rate, len(texts),
                ", windowed" if rule.window else "",
                ": its flags say little about the activation at hand" if rate >= WARN_RATE else "")

    def _window(self, key: tuple, rule: Rule) -> WindowState:
        state = self._windows.get(key)
        if state is None:
            state = self._windows[key] = WindowState(rule.window)
            while len(self._windows) > WINDOWS:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return state

    def _fires(self, rule: Rule, hit: bool, text: str | None, source: str, choice_index: int | None,
               token_index: int | None, request: dict | None) -> tuple[bool, dict | None]:
        """Whether ``rule`` fires on this explanation, and the window that made it (windowed rules)."""
        if rule.window is None:
            return hit, None
        if text is None or token_index is None or not rule.applies_to(source):
            return False, None  # not an explained position of this rule's
        key = ((request or {}).get("id"), choice_index, rule.name)
        window = self._window(key, rule).add(token_index, hit)
        return window is not None, window

    def check(self, *, text: str | None, fve: float | None, grounding: float | None, source: str,
              choice_index: int | None = None, token_index: int | None = None, token: str | None = None,
              request: dict | None = None, claims: list[dict] | None = None) -> list[MonitorEvent]:
        """The events of every rule ``text`` (with its scores and claims) fires; webhooks queued,
        counted. Windowed rules remember this explanation for the choice's next ones."""
        events = []
        for rule in self.rules:
            hit = rule.matches(text, fve, grounding, source, claims)
            fired, window = self._fires(rule, hit, text, source, choice_index, token_index, request)
            if not fired:
                continue
            ev = MonitorEvent(rule.name, rule.action, source, choice_index, token_index, token, text, fve, grounding,
                              time.time(), window)
            events.append(ev)
            if self.metrics is not None:
                self.metrics.record_monitor(rule.name, rule.action)
            if rule.action == "webhook" and self.webhooks is not None:
                self.webhooks.send(rule.url, ev.as_dict() | {"request": request or {}})
        return events
