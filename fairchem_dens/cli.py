"""The ``fairchem-dens`` command.

Subcommands live next to the code they drive. Each is listed in :data:`SUBCOMMANDS` as
``"module:function"``; the function receives the subparsers object, adds its parser and
sets ``func`` (called with the parsed arguments, returns the exit status). Modules are
imported only when the command line is built, and should keep heavy imports (torch,
fairchem) inside ``func`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING

from fairchem_dens import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

#: Registry of subcommands: add ``"package.module:register_function"`` to extend.
SUBCOMMANDS: list[str] = [
    "fairchem_dens.data.cli:register",
    "fairchem_dens.demo:register",
    "fairchem_dens.export:register",
]


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fairchem-dens",
        description="DeNS for fairchem-core 1.x: data preparation and training tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for entry in SUBCOMMANDS:
        module_name, function_name = entry.split(":")
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen subcommand."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
