"""`appliance-dev`: the peers for development and tests, as commands: a local Azure Relay, a
simulated mammography unit, and the cloud's side of the relay (send an action, consume events,
fetch images). Not part of the appliance: nothing in production imports this package.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from appliance import config as config_module
from appliance import log
from appliance.cli.offline import CommandTree, load, run
from appliance.relay.endpoint import RelayEndpoint


def cmd_dev_relay_emulator(args: argparse.Namespace) -> int:
    from appliance.app import cancel_on_signal
    from appliance.sdnotify import Notifier
    from appliance.testing.relay_emulator import RelayEmulator

    log.configure("INFO")
    key = config_module.read_secret(args.key_file, "--key-file")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_signal, nursery.cancel_scope, Notifier({}))
            emulator = RelayEmulator({args.key_name: key}, namespace=args.namespace)
            await nursery.start(emulator.run, args.host, args.port)
            print(
                f"relay emulator on {emulator.endpoint}, namespace {emulator.namespace}",
                file=sys.stderr,
            )

    trio.run(serve)
    return 0


def cmd_dev_cloud_fetch(args: argparse.Namespace) -> int:
    """The cloud fetching stored images (image.fetch): files land in --out, hash-checked."""
    from appliance.testing.cloud import FetchFailed, fetch

    relay = load(args).relay
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    target = {"study_instance_uid": args.study} if args.study else {"sop_instance_uid": args.sop}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(uid: str, offset: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{uid}: {offset} bytes", end="", file=sys.stderr, flush=True)

    try:
        files = trio.run(
            partial(
                fetch,
                RelayEndpoint.from_config(relay, relay.actions_path, key),
                target,
                out,
                on_chunk=progress,
            )
        )
    except FetchFailed as exc:
        print(f"cloud fetch: {exc}", file=sys.stderr)
        return 1
    for file in files:
        print(f"{file}  {file.stat().st_size} bytes  sha256 ok")
    return 0


def cmd_dev_cloud_send(args: argparse.Namespace) -> int:
    """The cloud in the sender role: one action to the appliance, its reply printed."""
    from trio_websocket import ConnectionRejected

    from appliance.testing.cloud import send_action

    relay = load(args).relay
    text = sys.stdin.read() if args.action == "-" else Path(args.action).read_text()
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    try:
        print(
            trio.run(send_action, RelayEndpoint.from_config(relay, relay.actions_path, key), text)
        )
    except ConnectionRejected as exc:
        print(f"cloud send: relay refused with HTTP {exc.status_code}", file=sys.stderr)
        return 1
    return 0


def cmd_dev_modality(args: argparse.Namespace) -> int:
    """A simulated mammography unit performing one worklist item against the configured ports."""
    from appliance.testing.modality import ModalitySimulator, SimulationError

    dicom = load(args).dicom
    unit = ModalitySimulator(
        host=args.host or ("127.0.0.1" if dicom.host == "0.0.0.0" else dicom.host),
        worklist_port=dicom.worklist.port,
        storage_port=dicom.storage.port,
        worklist_ae=dicom.worklist.ae_title,
        storage_ae=dicom.storage.ae_title,
        calling_ae=args.calling_ae,
    )
    try:
        stored = unit.run(args.accession, progress=print)
    except SimulationError as exc:
        print(f"modality: failed at phase {exc.phase}: {exc}", file=sys.stderr)
        return 1
    print(f"modality: done, {len(stored)} instances stored")
    return 0


def cmd_dev_cloud_events(args: argparse.Namespace) -> int:
    """The cloud in the listener role on the events path: acknowledge and print each event."""
    from appliance.app import cancel_on_signal
    from appliance.relay.listener import RelayListener
    from appliance.sdnotify import Notifier
    from appliance.testing.cloud import acknowledge

    relay = load(args).relay
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    log.configure("WARNING")

    def show(envelope: dict[str, Any]) -> None:
        if envelope.get("payload", {}).get("thumbnail"):
            envelope["payload"]["thumbnail"] = f"<{len(envelope['payload']['thumbnail'])} b64>"
        print(json.dumps(envelope), flush=True)

    consumer = RelayListener(
        name="cloud-events",
        endpoint=RelayEndpoint.from_config(relay, relay.events_path, key),
        conversation=acknowledge(show),
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(cancel_on_signal, nursery.cancel_scope, Notifier({}))
            await nursery.start(consumer.run)

    trio.run(serve)
    return 0


def _parser() -> CommandTree:
    tree = CommandTree("appliance-dev", __doc__, "TOOL")
    commands, command = tree.commands, tree.command

    emulator = command(commands, "relay-emulator", "a local Azure Relay", cmd_dev_relay_emulator)
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=9400)
    emulator.add_argument("--namespace", default="", help="default: HOST:PORT")
    emulator.add_argument("--key-name", default="RootManageSharedAccessKey")
    emulator.add_argument("--key-file", required=True)
    modality = command(
        commands, "modality", "a simulated unit performs one worklist item", cmd_dev_modality
    )
    modality.add_argument("accession")
    modality.add_argument("--host", default="", help="default: the configured dicom.host")
    modality.add_argument("--calling-ae", default="SIMULATOR")
    cloud = command(commands, "cloud", "the cloud's side of the relay")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")
    send = command(
        cloud_sub, "send", "send one action (a JSON file, or - for stdin)", cmd_dev_cloud_send
    )
    send.add_argument("action")
    command(
        cloud_sub, "events", "acknowledge and print the appliance's events", cmd_dev_cloud_events
    )
    fetch = command(
        cloud_sub, "fetch", "fetch stored images (image.fetch), resuming", cmd_dev_cloud_fetch
    )
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID: every stored instance")
    which.add_argument("--sop", help="SOP Instance UID: one instance")
    fetch.add_argument("--out", default=".", help="where the files go (default: here)")
    return tree


def main(argv: list[str] | None = None) -> int:
    return run(_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
