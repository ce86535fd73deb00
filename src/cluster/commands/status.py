"""`cluster status [--json]`: the cluster at a glance, as the master sees it right now.

It asks the master's read-only HTTP API (`GET /api/status`) and renders the answer with
`cluster.shared.status_view.render_text`; `--json` prints the API's JSON unchanged. Both go
through the same decoder, so a malformed answer is reported, never half-printed.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import sys
import urllib.error
import urllib.request
from typing import Final
from urllib.parse import urlsplit

from cluster.master.http_api import DEFAULT_PORT

DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"
TOKEN_ENV: Final = "CLUSTER_HTTP_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("CLUSTER_HTTP_URL", DEFAULT_URL),
        help=f"the master's HTTP API (default: $CLUSTER_HTTP_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"API token when the master binds a non-loopback address (default: ${TOKEN_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument(
        "--width", type=int, default=100, metavar="COLUMNS", help="terminal width (default 100)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="HTTP timeout"
    )


class StatusError(Exception):
    """The status could not be fetched or understood; the text says why."""


class StatusUsageError(StatusError):
    """An argument is unusable (exit code 2, like every other bad command line)."""


def fetch_status(url: str, token: str | None, timeout: float) -> bytes:
    if not (timeout > 0 and math.isfinite(timeout)):
        raise StatusUsageError(f"--timeout must be a finite number of seconds > 0, not {timeout}")
    if token is not None and not (token.isascii() and token.isprintable()):
        # It travels in an HTTP header: printable ASCII only (tokens the master makes are).
        raise StatusUsageError(
            "the API token must be printable ASCII (check --token or $" + TOKEN_ENV + ")"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError as exc:
        raise StatusUsageError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StatusUsageError(f"--url {url!r}: expected http://HOST:PORT, e.g. {DEFAULT_URL}")
    endpoint = f"{parts.scheme}://{parts.netloc}/api/status"
    request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        hint = f" (pass --token or set ${TOKEN_ENV})" if exc.code == 401 else ""
        raise StatusError(f"{endpoint} answered {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        why = getattr(exc, "reason", exc)
        raise StatusError(
            f"cannot reach the master's HTTP API at {endpoint}: {why} "
            "(is the master running with its HTTP API on that address?)"
        ) from None


def run(args: argparse.Namespace) -> int:
    from cluster.shared.status_view import from_json, render_text

    if args.width < 40:
        print("cluster status: --width must be at least 40 columns", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        body = fetch_status(args.url, token, args.timeout)
        try:
            status = from_json(body)
        except ValueError as exc:  # msgspec's DecodeError/ValidationError are ValueErrors
            raise StatusError(f"the master's /api/status answer is not a status: {exc}") from None
    except StatusError as exc:
        print(f"cluster status: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, StatusUsageError) else 1
    if args.json:
        sys.stdout.write(body.decode() + "\n")
    else:
        sys.stdout.write(render_text(status, width=args.width))
    return 0
