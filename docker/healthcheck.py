"""Container health probe: exit 0 when GET /readyz answers 200 (every model loaded and warmed up).

Docker's HEALTHCHECK and docker/compose.yaml run it inside the container; the slim image has no curl.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('SIGNSERVE_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while loading) is a URLError
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
