"""Shared tail of the benchmark scripts: write the results JSON atomically and print the table."""

from __future__ import annotations

import json
import os
import pathlib
import time


def finish(res: dict, out: pathlib.Path, table: str, start: float) -> int:
    """Record the duration and the final load average in `res["meta"]`, write `res` to `out`
    (through a temporary file, so an interrupted run never leaves half a JSON), print `table`."""
    res["meta"]["duration_s"] = time.perf_counter() - start
    res["meta"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, default=float) + "\n")
    tmp.replace(out)
    print()
    print(table)
    print(f"\nwrote {out} in {res['meta']['duration_s']:.0f} s")
    return 0
