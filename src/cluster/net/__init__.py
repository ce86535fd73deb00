"""Networking between master and workers over py-libp2p (trio only).

Pure pieces (framing, protocol messages, membership checks) import no libp2p, so they can be
tested without a network; `host` is the only module that touches libp2p directly.
"""
