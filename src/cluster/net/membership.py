"""Who may join the cluster: an allow-list of peer ids and/or a shared cluster secret.

Pure rules, no network. Noise already proves which key (peer id) is on the other end of a
connection; membership decides whether that peer id belongs to the cluster:

- allow-list: the peer id must be listed;
- cluster secret: the peer must answer an HMAC-SHA256 challenge over fresh nonces and both
  peer ids, so a recorded answer is useless on another connection or for another peer. The
  master proves it knows the secret too, so a worker cannot be lured by an impostor master.

With both configured a peer must pass both. See docs/membership.md.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cluster.shared.files import (
    LIST_FILE_LIMIT,
    SECRET_FILE_LIMIT,
    InputFileError,
    fsync_dir,
    read_input_file,
)
from cluster.shared.peer_ids import peer_id_problem

NONCE_BYTES: Final = 32
MIN_SECRET_BYTES: Final = 16


class MembershipConfigError(ValueError):
    """A membership file or value is invalid; the message names the file and the problem."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def _mac(secret: bytes, label: bytes, nonce: bytes, a: str, b: str) -> bytes:
    msg = b"\x00".join((b"cluster-hello-v1", label, nonce, a.encode(), b.encode()))
    return hmac.new(secret, msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class Membership:
    #: Peer ids allowed to join; None means "any peer that passes the secret check".
    allowed: frozenset[str] | None = None
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.allowed is None and self.secret is None:
            raise MembershipConfigError(
                "membership needs an allow-list of peer ids, a cluster secret, or both"
            )
        if self.secret is not None and len(self.secret) < MIN_SECRET_BYTES:
            raise MembershipConfigError(
                f"cluster secret is {len(self.secret)} bytes; at least {MIN_SECRET_BYTES} needed"
            )

    def refuse_reason(self, peer_id: str) -> str | None:
        """Why this (Noise-authenticated) peer may not even start hello, or None."""
        if self.allowed is not None and peer_id not in self.allowed:
            return f"peer {peer_id} is not on the cluster allow-list"
        return None

    # The master proves itself over the worker's nonce, the worker over the master's.
    def master_proof(self, worker_nonce: bytes, master_id: str, worker_id: str) -> bytes:
        if self.secret is None:
            return b""
        return _mac(self.secret, b"master", worker_nonce, master_id, worker_id)

    def worker_proof(self, master_nonce: bytes, worker_id: str, master_id: str) -> bytes:
        if self.secret is None:
            return b""
        return _mac(self.secret, b"worker", master_nonce, worker_id, master_id)

    def check_worker_proof(
        self, proof: bytes, master_nonce: bytes, worker_id: str, master_id: str
    ) -> str | None:
        """Why the worker's answer is refused, or None."""
        if self.secret is None:
            return None
        expected = self.worker_proof(master_nonce, worker_id, master_id)
        if not hmac.compare_digest(proof, expected):
            return f"peer {worker_id} failed the cluster-secret challenge"
        return None

    def check_master_proof(
        self, proof: bytes, worker_nonce: bytes, master_id: str, worker_id: str
    ) -> str | None:
        if self.secret is None:
            return None
        expected = self.master_proof(worker_nonce, master_id, worker_id)
        if not hmac.compare_digest(proof, expected):
            return (
                f"master {master_id} failed to prove it knows the cluster secret (or this "
                "worker's secret file differs from the master's)"
            )
        return None


def validate_peer_id(text: str, where: str) -> str:
    problem = peer_id_problem(text)
    if problem is not None:
        raise MembershipConfigError(f"{where}: {problem}")
    return text


def load_allow_file(path: Path) -> frozenset[str]:
    """One peer id per line; blank lines and `#` comments ignored."""
    try:
        lines = read_input_file(path, LIST_FILE_LIMIT).decode("utf-8").splitlines()
    except InputFileError as exc:
        raise MembershipConfigError(f"cannot read allow-list {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MembershipConfigError(f"allow-list {path} is not UTF-8 text") from exc
    ids = set()
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            ids.add(validate_peer_id(text, f"{path}:{n}"))
    return frozenset(ids)


def load_secret_file(path: Path) -> bytes:
    """The secret is the file's bytes with surrounding whitespace stripped."""
    try:
        data = read_input_file(path, SECRET_FILE_LIMIT).strip()
    except InputFileError as exc:
        raise MembershipConfigError(f"cannot read cluster secret {path}: {exc}") from None
    if len(data) < MIN_SECRET_BYTES:
        raise MembershipConfigError(
            f"cluster secret {path} holds {len(data)} bytes; at least {MIN_SECRET_BYTES} needed"
        )
    return data


def create_secret_file(path: Path) -> bytes:
    """A fresh random secret, written 0600 (hex text, so it can be copied by hand)."""
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secret + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)  # the new entry too: workers are given this secret
    return secret
