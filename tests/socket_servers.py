"""A listening socket served on a thread, for tests of clients that meet something else."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

#: Handles one accepted connection; the event is set when the server is shutting down.
Answer = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def serving(server: socket.socket, answer: Answer) -> Iterator[None]:
    """Accept connections on the bound, listening `server` and handle each with `answer`
    until the block ends; then close it."""
    server.settimeout(0.1)  # so that the thread sees `done` and ends
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                answer(conn, done)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=30)
        server.close()
