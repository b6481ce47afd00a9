"""Monitors: the operator's rules, applied to every explanation as it is produced.

A rules file (``--monitors FILE``, YAML: a list of rules, or ``{rules: [...]}``)::

    - name: being-tested
      when: {text_matches: "being (tested|evaluated)|an? (test|evaluation)"}
      positions: generated          # generated | prompt | all (default all)
      action: flag                  # flag | webhook (with url)
    - name: low-fidelity
      when: {fve_below: 0.0}
      action: webhook
      url: http://alerts.internal:9000/nla
    - name: stop-on-deception
      when: {text_matches: "deceiv|lying to the user"}
      action: abort                 # stop the answer (finish_reason content_filter)

A rule matches when every condition it gives holds: ``text_matches`` (a regular expression,
case-insensitive, searched in the explanation text), ``fve_below`` / ``fve_above`` (an explanation
without an FVE matches neither), ``grounding_below`` (an explanation that quotes nothing has no
grounding score and does not match it). Matches are reported on the explanation item
(``monitors: [rule names]``) and as ``monitor_events`` in the response, the stream and the audit
record; a ``webhook`` rule also POSTs the event (``webhooks.py``), never delaying the answer.

``abort`` stops the generation when a rule matches an explanation that resolves while the answer
is still being generated (explanations start as soon as their rows exist, ``generation.py``): the
choice ends with ``finish_reason: "content_filter"`` (with n > 1, every choice of the request
still running does: the engines abort a request as a whole). An explanation that resolves after
its choice has finished has nothing left to stop; its event is reported like a flag. Rules are
validated when the server starts; errors name the rule and the field.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

class MonitorConfigError(ValueError):
    """The rules file is wrong; the message names the file, the rule and the field."""


class When(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text_matches: str | None = Field(default=None, min_length=1, max_length=2000)
    fve_below: float | None = Field(default=None, allow_inf_nan=False)
    fve_above: float | None = Field(default=None, allow_inf_nan=False)
    grounding_below: float | None = Field(default=None, ge=0, le=1)

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
            raise ValueError("give at least one of text_matches, fve_below, fve_above, grounding_below")
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    when: When
    positions: Literal["generated", "prompt", "all"] = "all"
    action: Literal["flag", "webhook", "abort"] = "flag"
    url: str | None = Field(default=None, pattern=r"^https?://\S+$")

    @model_validator(mode="after")
    def _action(self):
        if self.action == "webhook" and not self.url:
            raise ValueError("webhook needs a url")
        if self.action != "webhook" and self.url:
            raise ValueError(f"url is only for action webhook, not {self.action}")
        return self

    def matches(self, text: str | None, fve: float | None, grounding: float | None, source: str) -> bool:
        if self.positions == "generated" and source != "completion":
            return False
        if self.positions == "prompt" and source != "prompt":
            return False
        w = self.when
        if w.text_matches is not None and (text is None or not _compiled(w.text_matches).search(text)):
            return False
        if w.fve_below is not None and (fve is None or not fve < w.fve_below):
            return False
        if w.fve_above is not None and (fve is None or not fve > w.fve_above):
            return False
        if w.grounding_below is not None and (grounding is None or not grounding < w.grounding_below):
            return False
        return True


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
    """One rule matching one explanation."""

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

    def as_dict(self) -> dict:
        return {"rule": self.rule, "action": self.action, "source": self.source, "choice_index": self.choice_index,
                "token_index": self.token_index, "token": self.token, "explanation": self.explanation,
                "fve": self.fve, "grounding": self.grounding, "time": self.time}


class Monitoring:
    """The server's rules, with what acting on them needs: metrics and the webhook sender."""

    def __init__(self, rules: tuple[Rule, ...] = (), *, metrics=None, webhooks=None):
        self.rules = rules
        self.metrics = metrics
        self.webhooks = webhooks

    def check(self, *, text: str | None, fve: float | None, grounding: float | None, source: str,
              choice_index: int | None = None, token_index: int | None = None, token: str | None = None,
              request: dict | None = None) -> list[MonitorEvent]:
        """The events of every rule ``text`` (with its scores) matches; webhooks queued, counted."""
        events = []
        for rule in self.rules:
            if not rule.matches(text, fve, grounding, source):
                continue
            ev = MonitorEvent(rule.name, rule.action, source, choice_index, token_index, token, text, fve, grounding,
                              time.time())
            events.append(ev)
            if self.metrics is not None:
                self.metrics.record_monitor(rule.name, rule.action)
            if rule.action == "webhook" and self.webhooks is not None:
                self.webhooks.send(rule.url, ev.as_dict() | {"request": request or {}})
        return events
