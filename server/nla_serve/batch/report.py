"""``nla-serve report results.jsonl [--against other.jsonl] --out report.html``: one self-contained
HTML page about a batch's explanations, and, with a second run (a base model and its adapter, two
checkpoints, two NLAs), where the two differ most.

Read from batch output lines (the Batch API's output file or ``nla-serve batch run``'s), whatever
the endpoint: every explanation item is taken with its line's ``custom_id``, choice and token.
Shown: the counts; the distributions of FVE, claim support and grounding (inline SVG, shares per
bin so runs of different sizes compare); monitor hits per rule; and, matched by custom_id, choice
and token, the explanations that differ most between the runs side by side (by word overlap, then
FVE), each with its request id linked to the viewer's record when ``--server`` is given.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from nla_serve.batch.svg import bars, histogram


@dataclass
class Item:
    custom_id: str
    request_id: str | None
    choice: int
    token_index: int | None
    token: str | None
    text: str | None
    fve: float | None
    grounding: float | None
    support: list[float] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    monitors: list[str] = field(default_factory=list)


@dataclass
class Run:
    name: str
    lines: int = 0
    failed: int = 0
    items: list[Item] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)


def answer_text(body: dict) -> str:
    choices = body.get("choices") or []
    if choices:
        c = choices[0]
        return (c.get("message") or {}).get("content") or c.get("text") or ""
    for out in body.get("output") or []:  # the Responses API
        for part in out.get("content") or []:
            if part.get("type") == "output_text":
                return part.get("text", "")
    return ""


def load_run(path: Path, name: str) -> Run:
    return load_lines(path.read_text(encoding="utf-8").splitlines(), name, where=str(path))


def load_lines(lines: list[str], name: str, where: str = "the batch output") -> Run:
    run = Run(name)
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            response, cid = line["response"], line["custom_id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{where}: line {n} is not a batch output line ({{custom_id, response: {{status_code, "
                             "body}}}})") from None
        run.lines += 1
        body = response.get("body") or {}
        if not 200 <= int(response.get("status_code") or 0) < 300:
            run.failed += 1
            continue
        run.answers[cid] = answer_text(body)
        for e in body.get("explanations") or body.get("data") or []:
            if not isinstance(e, dict) or "status" not in e:
                continue
            g = e.get("grounding")
            claims = e.get("claims") or []
            run.items.append(Item(cid, response.get("request_id") or body.get("id"), e.get("choice_index") or 0,
                                  e.get("token_index", e.get("index")), e.get("token"), e.get("text"), e.get("fve"),
                                  g.get("score") if isinstance(g, dict) else None,
                                  [c["support"] for c in claims if c.get("support") is not None],
                                  [c.get("verdict") or "unknown" for c in claims], list(e.get("monitors") or [])))
    return run


def words(text: str | None) -> set[str]:
    return set((text or "").lower().replace(".", " ").replace(",", " ").split())


def differences(a: Run, b: Run, top: int = 15) -> list[tuple[float, Item, Item]]:
    """Pairs of explanations of the same line, choice and token, most different first."""
    other = {(i.custom_id, i.choice, i.token_index): i for i in b.items}
    pairs = []
    for i in a.items:
        j = other.get((i.custom_id, i.choice, i.token_index))
        if j is None:
            continue
        wa, wb = words(i.text), words(j.text)
        overlap = len(wa & wb) / len(wa | wb) if wa | wb else 1.0
        dfve = abs((i.fve or 0) - (j.fve or 0))
        pairs.append((1 - overlap + 0.01 * dfve, i, j))
    return sorted(pairs, key=lambda p: -p[0])[:top]


def mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3f}" if values else "—"


def summary_rows(runs: list[Run]) -> str:
    def row(label, fn):
        return f"<tr><th>{escape(label)}</th>" + "".join(f"<td>{escape(str(fn(r)))}</td>" for r in runs) + "</tr>"

    def share(r, verdict):
        v = [x for i in r.items for x in i.verdicts]
        return f"{100 * v.count(verdict) / len(v):.0f}%" if v else "—"

    head = "<tr><th></th>" + "".join(f"<th>{escape(r.name)}</th>" for r in runs) + "</tr>"
    return ("<table class='summary'>" + head + row("lines", lambda r: r.lines) +
            row("failed lines", lambda r: r.failed) + row("explanations", lambda r: len(r.items)) +
            row("mean FVE", lambda r: mean(i.fve for i in r.items)) +
            row("mean grounding", lambda r: mean(i.grounding for i in r.items)) +
            row("claims supported", lambda r: share(r, "supported")) +
            row("claims contradicted", lambda r: share(r, "contradicted")) +
            row("monitor hits", lambda r: sum(len(i.monitors) for i in r.items)) + "</table>")


def record_link(server: str | None, request_id: str | None) -> str:
    if not request_id:
        return ""
    if server is None:
        return f"<code>{escape(request_id)}</code>"
    url = f"{server.rstrip('/')}/ui/#records/{request_id}"
    return f'<a href="{escape(url)}">{escape(request_id)}</a>'


def render(runs: list[Run], *, server: str | None = None, title: str = "Batch explanations") -> str:
    fve = histogram("FVE of explanations", [(r.name, [i.fve for i in r.items]) for r in runs], -1.0, 1.0)
    support = histogram("Support of claims", [(r.name, [s for i in r.items for s in i.support]) for r in runs],
                        -0.5, 0.5)
    grounding = histogram("Grounding score (quotes found)", [(r.name, [i.grounding for i in r.items]) for r in runs],
                          0.0, 1.0, bins=10)
    rules = sorted({m for r in runs for i in r.items for m in i.monitors})
    hits = bars("Monitor hits per rule", rules, [(r.name, [sum(i.monitors.count(rule) for i in r.items)
                                                           for rule in rules]) for r in runs])
    charts = [("Fidelity", "FVE: how much of each activation the reconstructor recovers from its explanation "
               "(1 perfect, 0 no better than a constant guess).", fve),
              ("Claims", "Support: the FVE a claim adds to its explanation; the verdicts use the NLA's calibrated "
               "thresholds.", support),
              ("Grounding", "The share of an explanation's quotes found in the text or the model's predictions.",
               grounding),
              ("Monitors", "Hits per monitor rule.", hits)]
    # the charts side by side where the window is wide enough: looked at together, not scrolled through
    sections = [f"<h1>{escape(title)}</h1>", summary_rows(runs), "<div class='charts'>" + "".join(
        f"<section><h2>{name}</h2><p class='hint'>{words}</p>{chart}</section>" for name, words, chart in charts)
        + "</div>"]
    if len(runs) == 2:
        rows = []
        for score, i, j in differences(*runs):
            rows.append(
                f"<tr><td><strong>{escape(i.custom_id)}</strong><br>token #{i.token_index} {escape(repr(i.token))}"
                f"<br><span class='hint'>difference {score:.2f}</span></td>"
                f"<td>{escape(i.text or '(none)')}<br><span class='hint'>FVE {i.fve if i.fve is None else round(i.fve, 3)}"
                f" · {record_link(server, i.request_id)}</span></td>"
                f"<td>{escape(j.text or '(none)')}<br><span class='hint'>FVE {j.fve if j.fve is None else round(j.fve, 3)}"
                f" · {record_link(server, j.request_id)}</span></td></tr>")
        sections.append(f"<h2>Where the two runs differ most</h2><p>The same line, choice and token, explained in "
                        f"each run; most different words first.</p><table class='diff'><tr><th>where</th>"
                        f"<th>{escape(runs[0].name)}</th><th>{escape(runs[1].name)}</th></tr>{''.join(rows)}</table>"
                        if rows else "<h2>Where the two runs differ most</h2><p>No explained token is in both runs.</p>")
    else:
        low = sorted((i for i in runs[0].items if i.fve is not None), key=lambda i: i.fve)[:15]
        sections.append("<h2>Least faithful explanations</h2><table class='diff'><tr><th>where</th><th>explanation"
                        "</th></tr>" + "".join(
                            f"<tr><td>{escape(i.custom_id)}<br>token #{i.token_index}</td><td>{escape(i.text or '')}"
                            f"<br><span class='hint'>FVE {i.fve:.3f} · {record_link(server, i.request_id)}</span></td></tr>"
                            for i in low) + "</table>")
    return PAGE.format(title=escape(title), body="\n".join(sections))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #1d1d1b; }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(26rem, 1fr)); gap: 0 2rem; }}
.charts h2 {{ margin-bottom: 0.2rem; }}
table {{ border-collapse: collapse; margin: 1rem 0; }} th, td {{ border: 1px solid #d8d8d2; padding: 0.3rem 0.6rem;
vertical-align: top; text-align: left; }} .hint {{ color: #5d5d58; font-size: 0.85rem; }}
svg.chart {{ display: block; max-width: 100%; height: auto; margin: 0.5rem 0 1.5rem; }}
table.diff td {{ max-width: 26rem; overflow-wrap: anywhere; }}
</style></head><body>
{body}
</body></html>
"""


def main(args) -> int:
    runs = [load_run(Path(args.results), args.label)]
    if args.against:
        runs.append(load_run(Path(args.against), args.against_label))
    Path(args.out).write_text(render(runs, server=args.server), encoding="utf-8")
    print(f"report written to {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="an HTML report of a batch's explanations (and of two runs compared)")
    p.add_argument("results", help="batch output lines (JSONL)")
    p.add_argument("--against", help="a second run's output lines, to compare with")
    p.add_argument("--label", default="run A")
    p.add_argument("--against-label", default="run B")
    p.add_argument("--server", help="the server's URL, to link each explanation to its record in the viewer")
    p.add_argument("--out", required=True)
    p.set_defaults(func=main)
