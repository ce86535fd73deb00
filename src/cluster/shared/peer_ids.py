"""What a libp2p peer id looks like, for every place that takes one as text.

Pure and libp2p-free: `cluster master --allow` and allow-list files
(`cluster.net.membership.validate_peer_id`) and the maintenance policy's `operator_ids`
check the same rule, so a value one accepts the others accept too.
"""

from __future__ import annotations

import re
from typing import Final

#: base58btc alphabet; libp2p peer ids (Ed25519 "12D3KooW…", RSA "Qm…") are 46-60 chars.
PEER_ID_RE: Final = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,80}")  # fullmatch: `$` allows "\n"


def peer_id_problem(text: str) -> str | None:
    """Why `text` is not a libp2p peer id (a sentence naming it), or None if it is one."""
    if PEER_ID_RE.fullmatch(text):
        return None
    return f"{text!r} is not a libp2p peer id (base58)"
