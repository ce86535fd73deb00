"""Subcommands of `cluster`. Each module defines `add_arguments(parser)` and `run(args) -> int`.

`add_arguments` must import nothing heavy (no libp2p): `cluster --help` builds every parser.
"""
