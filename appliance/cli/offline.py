"""What every command shares: the config it was given, and the one guard for commands that
must not run beside a live appliance (they change what only the appliance's stores may change).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from appliance import config as config_module
from appliance.config import Config, ConfigError
from appliance.state import StateInUse, StatePaths, exclusive
from appliance.storage.files import ensure_directory

#: Exit code of a command refused because the appliance (or another offline command) runs.
REFUSED = 2


class Refused(Exception):
    """The command cannot run now; the message says why and what to do."""


def config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", config_module.DEFAULT_PATH))


def load(args: argparse.Namespace) -> Config:
    return config_module.load(config_path(args))


@contextlib.contextmanager
def offline(paths: StatePaths, command: str) -> Iterator[None]:
    """Hold the state directory for the command's duration, or refuse: the appliance holds it
    while it runs, so nothing here ever writes beside it."""
    ensure_directory(paths.state_dir)
    try:
        with exclusive(paths):
            yield
    except StateInUse:
        raise Refused(
            f"{command}: the appliance is running on {paths.state_dir} (or another command is):"
            " stop it first (systemctl stop screening-gateway)"
        ) from None


Command = Callable[[argparse.Namespace], int]


class CommandTree:
    """A command with sub-commands, `--config` accepted before or after any of them (operators
    type both)."""

    def __init__(self, prog: str, description: str | None, metavar: str) -> None:
        self._common = argparse.ArgumentParser(add_help=False)
        self._common.add_argument(
            "--config",
            default=argparse.SUPPRESS,
            help=f"TOML config file (default {config_module.DEFAULT_PATH})",
        )
        self.parser = argparse.ArgumentParser(
            prog=prog, description=description, parents=[self._common]
        )
        self.commands = self.parser.add_subparsers(dest="command", required=True, metavar=metavar)

    def command(
        self,
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help: str,
        func: Command | None = None,
    ) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, parents=[self._common])
        if func is not None:
            sub.set_defaults(func=func)
        return sub


def run(tree: CommandTree, argv: list[str] | None) -> int:
    """Parse and run; configuration errors and refusals become their exit codes."""
    args = tree.parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    except Refused as exc:
        print(exc, file=sys.stderr)
        return REFUSED


def say(line: str) -> None:
    print(line, file=sys.stderr)
