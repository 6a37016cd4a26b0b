"""`just bench [storage] [worklist] [pipeline] [retrieve] [options]`: the appliance against
dcmtk (and Orthanc for retrieval), same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.bench import pipeline, retrieve, storage, uploads, worklist


def main() -> None:
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__)
    parser.add_argument(
        "suites", nargs="*", help="storage, worklist, pipeline, retrieve, uploads (default: all)"
    )
    parser.add_argument("--studies", type=int, default=4, help="FFDM studies (4 views, 27 MB each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    parser.add_argument("--queries", type=int, default=40, help="timed C-FIND queries per case")
    parser.add_argument("--renders", type=int, default=20, help="timed renders per case")
    args = parser.parse_args()
    every = ["storage", "worklist", "pipeline", "retrieve", "uploads"]
    suites = args.suites or every
    unknown = set(suites) - set(every)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    (Path.cwd() / "var").mkdir(exist_ok=True)  # every suite keeps its servers and data here
    if "storage" in suites:
        storage.main(args.studies, args.rounds)
    if "worklist" in suites:
        worklist.main(args.queries)
    if "pipeline" in suites:
        pipeline.main(args.renders)
    if "retrieve" in suites:
        retrieve.main(args.rounds)
    if "uploads" in suites:
        uploads.main(args.rounds)


main()
