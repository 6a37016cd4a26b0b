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


def plain(group: BaseExceptionGroup, *types: type[BaseException]) -> BaseException | None:
    """The group's first leaf if every leaf is one of `types` (so callers can handle it as the
    plain exception it is), else None."""
    found = list(leaves(group))
    if found and all(isinstance(leaf, types) for leaf in found):
        return found[0]
    return None
