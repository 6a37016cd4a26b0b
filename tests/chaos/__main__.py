"""`just chaos [--long] [scenario ...]`: the appliance under faults and load, a table of figures.

Short form (CI): 5 kill cycles, a 10 s relay outage, 5 power cuts, 1,000 malformed cases, 2
minutes of load. Long form (--long, for the closing note and docs/reliability.md): 20 kill
cycles, a 5 minute outage, 100 power cuts, 2,000 malformed cases, 10 minutes of load. Exits 1
when any invariant broke.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from appliance import log
from tests.chaos import Result, crash, disk, load, malformed, powercut, relay

SCENARIOS = ["crash", "relay", "disk", "powercut", "malformed", "load"]


def main() -> int:
    parser = argparse.ArgumentParser(prog="just chaos", description=__doc__)
    parser.add_argument("scenarios", nargs="*", help=f"{', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--long", action="store_true", help="the long form")
    args = parser.parse_args()
    chosen = args.scenarios or SCENARIOS
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    long = args.long
    # The cloud-side relay consumers run in this process: their expected failures during an
    # outage are figures in the table, not lines on the console.
    log.configure(level="ERROR")
    root = Path(tempfile.mkdtemp(prefix="chaos-", dir=Path.cwd() / "var"))
    results: list[Result] = []
    started = time.monotonic()
    try:
        for name in chosen:
            print(f"chaos: {name} ...", flush=True)
            work = root / name
            work.mkdir(parents=True)
            if name == "crash":
                results.append(
                    crash.run(work, cycles=20 if long else 5, studies=30 if long else 12)
                )
            elif name == "relay":
                results += relay.run(work, outage_s=300 if long else 10, studies=10 if long else 3)
            elif name == "disk":
                results.append(disk.run(work))
            elif name == "powercut":
                results.append(powercut.run(work, cuts=100 if long else 5))
            elif name == "malformed":
                results.append(malformed.run(work, cases=2000 if long else 1000))
            elif name == "load":
                results.append(load.run(work, seconds=600 if long else 120))
            print(f"chaos: {name} done ({'ok' if results[-1].ok else 'BROKEN'})", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'scenario':22} {'result':7} figures")
    for result in results:
        figures = "; ".join(f"{k}={v}" for k, v in result.figures.items())
        print(f"{result.scenario:22} {'ok' if result.ok else 'BROKEN':7} {figures}")
        for reason in result.broken:
            print(f"{'':22} {'':7} broken: {reason}")
    print(f"\nchaos: {len(results)} scenarios in {time.monotonic() - started:.0f} s")
    return 0 if all(r.ok for r in results) else 1


sys.exit(main())
