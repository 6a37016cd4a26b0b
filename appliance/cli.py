"""The `appliance` command. Exit codes: 0 success, 1 failure at run time, 2 bad usage or config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from appliance import config as config_module
from appliance import log
from appliance.config import Config, ConfigError


def _config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", config_module.DEFAULT_PATH))


def _load(args: argparse.Namespace) -> Config:
    return config_module.load(_config_path(args))


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.app import serve
    from appliance.sdnotify import Notifier
    from appliance.supervisor import RestartBudgetExceeded, describe_error

    config = _load(args)
    log.configure(config.log.level, config.log.format)
    notifier = Notifier()
    status = 0
    try:
        trio.run(serve, config, notifier)
    except* RestartBudgetExceeded as group:
        for exc in _leaves(group):
            log.get_logger("appliance").error(
                "appliance.failed", phase="supervision", service_name=exc.service, error=str(exc)
            )
        status = 1
    except* Exception as group:
        # Anything else escaping the supervisor is a startup failure (state dir, index, ...).
        log.get_logger("appliance").exception(
            "appliance.failed", phase="startup", error=describe_error(group)
        )
        status = 1
    finally:
        notifier.close()
    return status


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(json.dumps(config_module.effective(config), indent=2))
    print(f"config ok: {_config_path(args)}", file=sys.stderr)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from appliance.storage.layout import StorageLayout
    from appliance.storage.recovery import ProgressPrinter, recover
    from appliance.storage.store import InstanceStore

    config = _load(args)
    store = InstanceStore(StorageLayout(config.state_dir))
    store.open()
    try:
        report = recover(
            store.layout,
            store.index,
            verify_hashes=args.verify_hashes,
            progress=ProgressPrinter(lambda line: print(line, file=sys.stderr)),
        )
        indexed = store.index.count()
    finally:
        store.close()
    print(
        f"fsck: {indexed} indexed instances; spool files removed {report.spool_files_removed}, "
        f"re-indexed {report.files_reindexed}, missing {report.rows_missing}, "
        f"corrupt {report.rows_corrupt}, restored {report.rows_restored}, "
        f"unrecognised files {len(report.files_unrecognised)}"
        + (f", hashes verified {report.files_checked}" if args.verify_hashes else "")
    )
    for path in report.files_unrecognised:
        print(f"fsck: unrecognised file storage/{path}")
    # Non-zero when something was wrong, so scripts and runbooks notice; repairs are done.
    return 0 if report.clean else 1


def _parser() -> argparse.ArgumentParser:
    # `--config` may come before or after the sub-command: operators type both.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"TOML config file (default {config_module.DEFAULT_PATH})",
    )
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, help: str, func=None) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, parents=[common])
        if func is not None:
            sub.set_defaults(func=func)
        return sub

    command(commands, "run", "run the appliance until SIGTERM", cmd_run)
    config_cmd = command(commands, "config", "configuration tools")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    command(config_sub, "check", "validate and print the effective config", cmd_config_check)
    fsck = command(commands, "fsck", "reconcile stored files with the index, repairing", cmd_fsck)
    fsck.add_argument(
        "--verify-hashes", action="store_true", help="re-read every file and check its SHA-256"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
