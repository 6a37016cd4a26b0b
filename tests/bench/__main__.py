"""`just bench [storage] [worklist] [options]`: the appliance against dcmtk, same run."""

from __future__ import annotations

import argparse

from tests.bench import pipeline, storage, worklist


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__)
    parser.add_argument("suites", nargs="*", help="storage, worklist, pipeline (default: all)")
    parser.add_argument("--studies", type=int, default=4, help="FFDM studies (4 views, 27 MB each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    parser.add_argument("--queries", type=int, default=40, help="timed C-FIND queries per case")
    parser.add_argument("--renders", type=int, default=20, help="timed renders per case")
    args = parser.parse_args()
    suites = args.suites or ["storage", "worklist", "pipeline"]
    unknown = set(suites) - {"storage", "worklist", "pipeline"}
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    if "storage" in suites:
        storage.main(args.studies, args.rounds)
    if "worklist" in suites:
        worklist.main(args.queries)
    if "pipeline" in suites:
        pipeline.main(args.renders)


main()
