"""The cloud's side of the relay, for development, the demo and tests.

`send_action`: the sender role on the actions hybrid connection (one action, its reply).
`acknowledge`: a conversation for a listener on the events hybrid connection that records each
envelope and acknowledges it, as the Manage Breast Screening service does.
`fetch`: image.fetch with resume and hash checks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection

from appliance.relay.endpoint import RelayEndpoint
from appliance.relay.websocket import open_websocket


def _connect(endpoint: RelayEndpoint) -> AbstractAsyncContextManager[WebSocketConnection]:
    """The sender role on a hybrid connection, with a fresh five-minute token."""
    url, _expiry = attrs.evolve(endpoint, token_lifetime=300).address("connect")
    return open_websocket(url, max_message_size=16 << 20)


async def send_action(endpoint: RelayEndpoint, text: str) -> str:
    async with _connect(endpoint) as ws:
        await ws.send_message(text)
        reply = await ws.get_message()
    return reply if isinstance(reply, str) else reply.decode()


def acknowledge(
    record: Callable[[dict[str, Any]], Awaitable[None] | None],
) -> Callable[[WebSocketConnection], Awaitable[None]]:
    async def conversation(ws: WebSocketConnection) -> None:
        try:
            while True:
                envelope = json.loads(await ws.get_message())
                outcome = record(envelope)
                if outcome is not None:
                    await outcome
                await ws.send_message(json.dumps({"ack": envelope["event_id"]}))
        except ConnectionClosed:
            return

    return conversation


class FetchFailed(Exception):
    """The appliance refused the fetch, or a file arrived with the wrong SHA-256."""


async def fetch(
    endpoint: RelayEndpoint,
    target: dict[str, str],
    directory: Path,
    *,
    attempts: int = 5,
    on_chunk: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """`image.fetch` as the cloud runs it: files land in `directory` as `<SOP UID>.dcm` once
    their SHA-256 matches the header's; a dropped connection resumes where the bytes stopped."""
    done: dict[str, Path] = {}
    resume: tuple[str, int] | None = None
    failures = 0
    while True:
        parameters: dict[str, Any] = dict(target)
        if resume is not None and "sop_instance_uid" in target:
            parameters["offset"] = resume[1]
        elif resume is not None:
            parameters["resume_from"] = {"sop_instance_uid": resume[0], "offset": resume[1]}
        part = None
        try:
            async with _connect(endpoint) as ws:
                await ws.send_message(
                    json.dumps(
                        {
                            "action_type": "image.fetch",
                            "action_id": "fetch",
                            "parameters": parameters,
                        }
                    )
                )
                while True:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        if part is None:  # the rest of a file that is already complete here
                            continue
                        assert resume is not None  # set by the file's header
                        await part.write(message)
                        resume = (resume[0], resume[1] + len(message))
                        if on_chunk is not None:
                            on_chunk(resume[0], resume[1])
                        continue
                    frame = json.loads(message)
                    kind = frame.get("type")
                    if kind == "image.header":
                        uid = frame["sop_instance_uid"]
                        if uid in done:
                            part = None
                            continue
                        part_path = trio.Path(directory / f"{uid}.dcm.part")
                        if frame["offset"] and not await part_path.exists():
                            raise FetchFailed(f"{uid}: offered from an offset, no partial file")
                        part = await part_path.open("r+b" if frame["offset"] else "wb")
                        await part.truncate(frame["offset"])
                        await part.seek(frame["offset"])
                        resume, expected = (uid, frame["offset"]), frame["sha256"]
                    elif kind == "image.trailer":
                        if part is None:
                            continue
                        assert resume is not None  # set by the file's header
                        await part.aclose()
                        part = None
                        data = await part_path.read_bytes()
                        if hashlib.sha256(data).hexdigest() != expected:
                            raise FetchFailed(f"{resume[0]}: SHA-256 differs from the header's")
                        final = directory / f"{resume[0]}.dcm"
                        await part_path.rename(final)
                        done[resume[0]] = final
                    elif frame.get("status") == "done":
                        return list(done.values())
                    else:
                        raise FetchFailed(frame.get("message", str(frame)))
        except (ConnectionClosed, ConnectionRejected, HandshakeError, OSError) as exc:
            if part is not None:
                await part.aclose()  # keep what arrived: the next attempt resumes from it
            failures += 1
            if failures >= attempts:
                raise FetchFailed(f"gave up after {failures} dropped connections: {exc}") from exc
            await trio.sleep(0.2 * failures)
