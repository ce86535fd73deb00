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
import ssl
import sys
import urllib.error
import urllib.request
from typing import Final
from urllib.parse import urlsplit

from cluster.master.http_api import DEFAULT_PORT
from cluster.shared.humanize import clip, printable

DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"
TOKEN_ENV: Final = "CLUSTER_HTTP_TOKEN"
MAX_TIMEOUT_S: Final = 86_400


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


#: What an operator may paste after the API's base address: the status endpoint itself.
_ENDPOINT: Final = "/api/status"


def api_base(url: str) -> str:
    """`scheme://host:port[/prefix]` of the HTTP API `--url` names; StatusUsageError if
    unusable. A path is kept as the prefix a reverse proxy serves the API under
    (`https://proxy/cluster` asks `https://proxy/cluster/api/status`), without a trailing
    slash or a pasted `/api/status`."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError as exc:
        raise StatusUsageError(f"--url {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StatusUsageError(f"--url {url!r}: expected http://HOST:PORT, e.g. {DEFAULT_URL}")
    if parts.username is not None or parts.password is not None:
        raise StatusUsageError(
            f"--url {url!r}: no user name or password in the URL; the API takes --token"
        )
    if not parts.netloc.isprintable() or any(c.isspace() for c in parts.netloc):
        raise StatusUsageError(
            f"--url {url!r}: the host cannot contain spaces or control characters"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise StatusUsageError(
            f"--url {url!r}: no query or fragment; give the API's address, e.g. {DEFAULT_URL}"
        )
    path = parts.path.rstrip("/")
    path = path.removesuffix(_ENDPOINT).rstrip("/")
    if not (path.isascii() and path.isprintable()) or " " in path:
        raise StatusUsageError(
            f"--url {url!r}: the path must be printable ASCII without spaces "
            "(percent-encode anything else)"
        )
    return f"{parts.scheme}://{parts.netloc}{path}"


def fetch_status(url: str, token: str | None, timeout: float) -> bytes:
    if not (timeout > 0 and math.isfinite(timeout)):
        raise StatusUsageError(f"--timeout must be a finite number of seconds > 0, not {timeout}")
    if timeout > MAX_TIMEOUT_S:  # a socket timeout beyond time_t is an OverflowError
        raise StatusUsageError(
            f"--timeout must be at most {MAX_TIMEOUT_S:,} seconds (a day), not {timeout:g}"
        )
    if token is not None and not (token.isascii() and token.isprintable()):
        # It travels in an HTTP header: printable ASCII only (tokens the master makes are).
        raise StatusUsageError(
            "the API token must be printable ASCII (check --token or $" + TOKEN_ENV + ")"
        )
    base = api_base(url)
    endpoint = f"{base}{_ENDPOINT}"
    request = urllib.request.Request(endpoint, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        raise StatusError(_refusal(base, exc)) from None
    except http.client.InvalidURL as exc:  # a host http.client will not send, e.g. "a%20b"
        raise StatusUsageError(f"--url {url!r}: {_said(str(exc))}") from None
    except urllib.error.URLError as exc:  # before any answer: connecting, TLS, sending
        raise StatusError(_no_connection(base, exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:  # the answer, or what came instead
        raise StatusError(_no_answer(base, exc, timeout)) from None


def not_our_api(base: str, why: str) -> str:
    """The one line for an address where something else than our HTTP API answers."""
    return f"{base} is not a cluster master's HTTP API: {why}"


def _said(text: str, limit: int = 120) -> str:
    """What a peer sent or an error said, as one line of bounded length (it may be anything:
    a libp2p port answers binary, a web server a page of HTML)."""
    return clip(printable(text.strip()), limit)


def _no_connection(base: str, reason: object) -> str:
    if isinstance(reason, ssl.SSLError) and not isinstance(reason, ssl.SSLCertVerificationError):
        return not_our_api(base, f"the TLS handshake failed ({reason.reason or reason})")
    if isinstance(reason, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return not_our_api(base, "it dropped the connection before the request was sent")
    return (
        f"cannot reach the master's HTTP API at {base}: {_said(str(reason))} "
        "(is the master running with its HTTP API on that address? It writes the address it "
        "serves on to <data-dir>/http.url, which `--http 127.0.0.1:0` needs: "
        '`cluster status --url "$(cat DATA_DIR/http.url)"`)'
    )


def _no_answer(base: str, exc: OSError | http.client.HTTPException, timeout: float) -> str:
    """The connection was made and the request sent; what came back was no HTTP answer."""
    if isinstance(exc, http.client.RemoteDisconnected):  # also a ConnectionResetError
        return not_our_api(base, "it closed the connection without answering")
    if isinstance(exc, ConnectionError):
        return not_our_api(base, "it reset the connection without answering")
    if isinstance(exc, TimeoutError):
        return (
            f"{base} accepted the connection but sent no answer within {timeout:g} s "
            "(is it a cluster master's HTTP API?)"
        )
    if isinstance(exc, http.client.BadStatusLine):
        return not_our_api(base, f"it answered '{_said(str(exc.args[0]), 60)}', not HTTP")
    if isinstance(exc, http.client.HTTPException):
        return not_our_api(
            base, f"its answer is not valid HTTP ({_said(str(exc) or type(exc).__name__)})"
        )
    return f"the connection to {base} failed: {_said(str(exc))}"


def _refusal(base: str, exc: urllib.error.HTTPError) -> str:
    """An HTTP answer other than 200: the master's own refusals are one line of text."""
    try:
        detail = exc.read(4096).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):
        detail = ""
    if not (detail.startswith(f"{exc.code} ") and "\n" not in detail):
        return not_our_api(base, f"GET /api/status answered {exc.code} {_said(str(exc.reason))}")
    hint = f" (pass --token or set ${TOKEN_ENV})" if exc.code == 401 else ""
    return f"{base}/api/status answered {exc.code}: {_said(detail, 300)}{hint}"


def run(args: argparse.Namespace) -> int:
    import msgspec

    from cluster.shared.status_view import from_json, render_text

    if args.width < 40:
        print("cluster status: --width must be at least 40 columns", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        body = fetch_status(args.url, token, args.timeout)
        try:
            status = from_json(body)
        except msgspec.ValidationError as exc:  # JSON, but not a status
            raise StatusError(
                f"{api_base(args.url)}/api/status answered JSON that is not a cluster status "
                f"(another program, or a master of another version?): {_said(str(exc))}"
            ) from None
        except msgspec.DecodeError as exc:
            raise StatusError(
                not_our_api(api_base(args.url), f"its /api/status answer is not JSON ({exc})")
            ) from None
    except StatusError as exc:
        print(f"cluster status: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, StatusUsageError) else 1
    if args.json:
        sys.stdout.write(body.decode() + "\n")
    else:
        sys.stdout.write(render_text(status, width=args.width))
    return 0
