"""The `sdrt` command. Each subcommand is a module of this package, registered by one line in SUBCOMMANDS.

A subcommand module provides:
    HELP: str                                   one line for `sdrt --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        the exit code; raise sdrt.SdrtError for bad input

Exit codes: 0 success, 2 bad input or a missing/corrupt model (one line on stderr), 1 a bug (traceback).
The CLI alone prints; everything else logs. Error lines show any character that is not printable (a
terminal escape sequence in a path, a byte that is not UTF-8) as a Python escape, never raw.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from sdrt import __version__
from sdrt.errors import SdrtError

# name -> module providing HELP, add_arguments and run (imported when the parser is built; keep their
# top level free of torch so `sdrt --help` and argument errors answer at once)
SUBCOMMANDS = {
    "generate": "sdrt.cli.generate",
    "info": "sdrt.cli.info",
    "export": "sdrt.cli.export",
    "build": "sdrt.cli.build",
    "check": "sdrt.cli.check",
    "bench": "sdrt.cli.bench",
    "serve": "sdrt.cli.serve",
}

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (prog: error: message) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="sdrt", description="sdrt: a Stable Diffusion inference runtime")
    parser.add_argument("--version", action="version", version=f"sdrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    commands.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def _one_line(message) -> str:
    """The message on one line, with every non-printable character escaped (\\x1b, \\udcff, ...)."""
    text = " ".join(str(message).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except SdrtError as e:
        print(f"sdrt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
