"""What every command shares: the config it was given, and the one guard for commands that
must not run beside a live appliance (they change what only the appliance's stores may change).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from appliance import config as config_module
from appliance.config import Config
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


def say(line: str) -> None:
    print(line, file=sys.stderr)
