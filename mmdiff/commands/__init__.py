"""The `mmdiff` command line: data, train, generate, caption, sample-pairs, vary, demo, bench, eval, sweep,
eval-encoder, eval-samplers, plot, serve.

Every command is one module here with `add_parser(subparsers)` and `run(args) -> int`; the work itself lives in the
library (training, pipelines, eval, bench, serve). Bad input of any kind is one `mmdiff CMD: error: ...` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, data, demo, sample, serve, train
from . import eval as eval_commands
from .errors import error_line, is_input_error

# (module, the subcommands it adds), in the order `mmdiff --help` lists them
COMMANDS = (
    (data, ("data",)),
    (train, ("train",)),
    (sample, ("generate", "caption", "sample-pairs", "vary")),
    (demo, ("demo",)),
    (bench, ("bench",)),
    (eval_commands, ("eval", "sweep", "eval-encoder", "eval-samplers", "plot")),
    (serve, ("serve",)),
)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with its errors as the one `mmdiff CMD: error: ...` line every other error gets (argparse prints
    the whole usage first); subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="mmdiff", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for module, _ in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad argument (2, its line already printed): a status, not a raise
        return done.code if isinstance(done.code, int) else 2
    module = next(module for module, names in COMMANDS if args.cmd in names)
    try:
        return module.run(args)
    except Exception as err:
        if not is_input_error(err):
            raise
        command = f"{args.cmd} {args.data_cmd}" if args.cmd == "data" else args.cmd  # as argparse names it
        print(f"mmdiff {command}: error: {error_line(err)}", file=sys.stderr)
        return 2
