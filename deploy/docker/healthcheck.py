#!/usr/bin/env python3
"""Container health check: GET http://127.0.0.1:$MINIINFER_PORT/health -> exit 0 when it answers 200.

Standard library only (the slim images have no curl). ``miniinfer-healthcheck [URL]`` checks another URL.
The server answers 503 while it starts or drains, so an unhealthy result also covers a stuck engine thread.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 4.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as error:
        print(f"unhealthy: {url}: {error}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url} answered {response.status}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('MINIINFER_PORT', '8000')}/health"
    return check(url)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
