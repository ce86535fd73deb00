"""A node's persistent identity: an Ed25519 seed in <data-dir>/node.key.

The node id is the libp2p peer id derived from that key, so it survives restarts and a
restarted worker is the same node, not a ghost (DESIGN section 4).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Final

from cluster.shared.files import make_dirs_durably, write_bytes_durably

KEY_FILE: Final = "node.key"
SEED_BYTES: Final = 32


class IdentityError(Exception):
    """The key file is missing where required, unreadable, or not a 32-byte seed."""


def load_or_create_seed(data_dir: Path) -> bytes:
    """The node's 32-byte seed, created (mode 0600) on first use."""
    path = data_dir / KEY_FILE
    try:
        make_dirs_durably(data_dir)
    except OSError as exc:
        raise IdentityError(f"cannot create data directory {data_dir}: {exc.strerror}") from exc
    if not path.exists():
        seed = os.urandom(SEED_BYTES)
        write_bytes_durably(path, seed)
        return seed
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"{path} is not a regular file")
        seed = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read node key {path}: {exc.strerror}") from exc
    if len(seed) != SEED_BYTES:
        raise IdentityError(
            f"node key {path} holds {len(seed)} bytes; expected a {SEED_BYTES}-byte Ed25519 "
            "seed (delete it to make a new identity)"
        )
    return seed


def key_pair_from_seed(seed: bytes) -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair(seed)


def peer_id_of(key_pair: Any) -> str:
    from libp2p.peer.id import ID

    return str(ID.from_pubkey(key_pair.public_key).to_base58())


def load_identity(data_dir: Path) -> tuple[Any, str]:
    """(libp2p KeyPair, node id) for the node whose data lives in `data_dir`."""
    kp = key_pair_from_seed(load_or_create_seed(data_dir))
    return kp, peer_id_of(kp)
