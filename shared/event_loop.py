"""Run a coroutine on uvloop where it is installed, else on asyncio's own loop.

uvloop has no Windows build, so the edge install does not require it; everything that runs an
event loop on the edge goes through `run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

Result = TypeVar("Result")


def run(coroutine: Coroutine[Any, Any, Result]) -> Result:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
