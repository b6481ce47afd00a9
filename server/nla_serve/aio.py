"""Small asyncio helpers shared by the server's background tasks."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(*tasks: "asyncio.Task | None") -> None:
    """Cancel ``tasks`` and wait until each has ended, whatever it raised: a stopping owner
    (supervisor, worker, batch runner, verbaliser fleet) must not leave a task running behind it,
    and the task's own failure was already its business."""
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    for t in live:
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass
