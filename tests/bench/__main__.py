"""`just bench [storage] [--studies N] [--rounds N]`: the appliance against dcmtk, same run."""

from __future__ import annotations

import argparse

from tests.bench import storage


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help="storage (default: all)")
    parser.add_argument("--studies", type=int, default=4, help="FFDM studies (4 views, 27 MB each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    args = parser.parse_args()
    suites = args.suites or ["storage"]
    if "storage" in suites:
        storage.main(args.studies, args.rounds)


main()
