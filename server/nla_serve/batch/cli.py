"""``nla-serve batch run requests.jsonl --out results.jsonl [server flags]``: a batch file answered
offline, by the same code as the Batch API (the server's app and batch runner, in this process,
with no port open), with a progress bar. The output is OpenAI's batch output lines, errors
included, in input order. Interrupted, the same command resumes from ``OUT.state.db``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


def register(sub) -> None:
    from nla_serve.api.serve import add_server_flags

    p = sub.add_parser("batch", help="answer a batch file offline (the Batch API's code, no server)")
    actions = p.add_subparsers(dest="batch_command", required=True)
    run = actions.add_parser("run", help="answer every line of a batch input file",
                             description=__doc__.splitlines()[0])
    run.add_argument("input", help="JSONL of {custom_id, method, url, body} lines, as for POST /v1/batches")
    run.add_argument("--out", required=True, help="where the answers go (JSONL, OpenAI's batch output lines)")
    run.add_argument("--no-progress", action="store_true")
    add_server_flags(run)
    run.set_defaults(func=run_batch)


def run_batch(args: argparse.Namespace) -> int:
    from nla_serve.api.serve import settings_from
    from nla_serve.errors import ClientError

    out = Path(args.out)
    state = out.with_name(out.name + ".state.db")
    settings = settings_from(args).replace(batch_db=str(state), batch=True)
    try:
        total = asyncio.run(_run(settings, Path(args.input), out, progress=not args.no_progress))
    except ClientError as e:
        print(f"nla-serve batch run: {e.message}", file=sys.stderr)
        return 2
    state.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(state) + suffix).unlink(missing_ok=True)
    print(f"{total} answers written to {out}", file=sys.stderr)
    return 0


async def _run(settings, input_path: Path, out: Path, *, progress: bool) -> int:
    from tqdm import tqdm

    from nla_serve.api.app import create_app
    from nla_serve.batch.files import parse_lines
    from nla_serve.batch.shape import new_batch, output_line

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        store, runner = app.state.batch
        existing = await asyncio.to_thread(store.batches, None, None, 1)
        if existing:  # an interrupted run of this command: its answered lines stay answered
            doc = existing[0]
        else:
            lines = parse_lines(input_path.read_bytes(), endpoint=None, max_lines=settings.batch.max_lines)
            doc = new_batch(f"file:{input_path.name}", lines[0][1]["url"], len(lines), None)
            await asyncio.to_thread(store.add_batch, doc, None, lines)
        runner.wake()
        total = doc["request_counts"]["total"]
        with tqdm(total=total, desc="batch", disable=not progress) as bar:
            while True:
                doc, _ = await asyncio.to_thread(store.batch, doc["id"])
                counts = doc["request_counts"]
                bar.n = counts["completed"] + counts["failed"]
                bar.set_postfix(failed=counts["failed"])
                bar.refresh()
                if doc["status"] in ("completed", "cancelled"):
                    break
                await asyncio.sleep(0.5)
        rows = await asyncio.to_thread(store.results, doc["id"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(output_line(doc["id"], n, cid, code, res) + "\n" for n, cid, code, res in rows),
                   encoding="utf-8")
    tmp.replace(out)
    return len(rows)
