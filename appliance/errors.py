"""Exception groups, as Trio nurseries raise them: their leaves, and a one-line cause."""

from __future__ import annotations

from collections.abc import Iterator


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def describe(exc: BaseException) -> str:
    """For status output and logs: the leaves of a group, not the nursery's wrapper."""
    return "; ".join(f"{type(leaf).__name__}: {leaf}" for leaf in leaves(exc))
