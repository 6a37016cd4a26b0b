"""The one door from pynetdicom's threads into Trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class ApplianceStopping(Exception):
    """Trio is gone or going: the request cannot be completed now."""


class TrioDoor:
    """The one door from pynetdicom's threads into Trio.

    Handlers call ``door.run(async_fn, *args)``; if the appliance is shutting down the call raises
    ApplianceStopping, which a handler answers with a DICOM failure status.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token

    @classmethod
    def current(cls) -> TrioDoor:
        return cls(trio.lowlevel.current_trio_token())

    def run(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return trio.from_thread.run(async_fn, *args, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            raise ApplianceStopping("appliance is stopping") from exc
