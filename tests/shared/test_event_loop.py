"""The event-loop helper runs a coroutine with uvloop and, where uvloop is missing, with asyncio alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from shared.event_loop import run

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_uses_uvloop_where_installed() -> None:
    assert run(_loop_module()).startswith("uvloop")


def test_falls_back_to_asyncio_without_uvloop() -> None:
    script = ("import sys, asyncio; sys.modules['uvloop'] = None\n"
              "from shared.event_loop import run\n"
              "async def loop(): return type(asyncio.get_running_loop()).__module__\n"
              "print(run(loop()))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("asyncio")
