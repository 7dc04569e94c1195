"""Waiting in tests for something another process does on its own time (a log line written, a page
reporting, a replica coming back)."""

from __future__ import annotations

import time


def wait_for(cond, timeout_s: float, what: str, every_s: float = 0.1):
    """cond()'s first truthy value, polled every `every_s`; an AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)
