"""python -m common.wait_ready URL [TIMEOUT_S]: wait until URL/health says ok.

Exits 0 when ready, 1 when the server reports an error (e.g. the model failed to load) or the time runs out.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request


def wait_ready(url: str, timeout_s: float = float("inf")) -> str | None:
    """None when ready, else why not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return None
        except urllib.error.HTTPError as e:  # 503 while loading; the body says whether it failed
            try:
                body = json.loads(e.read() or b"{}")
            except ValueError:
                body = {}
            if body.get("status") == "error":
                return f"{url} reports an error: {body.get('detail')}"
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    return f"{url} was not ready within {timeout_s} s"


if __name__ == "__main__":
    problem = wait_ready(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else float("inf"))
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(1)
