"""Re-run fuzz cases recorded with ``FUZZ_RECORD`` (one process, verbose), to study a finding::

    python tests/fuzz_replay.py /tmp/fuzz.jsonl            # every failing case
    python tests/fuzz_replay.py /tmp/fuzz.jsonl 3 --show   # the fourth one, with its source
"""

from __future__ import annotations

import json
import re
import sys

import torch
from fuzz_harness import run_case
from fuzz_masks import ArgSpec
from fuzz_programs import Program, Sizes


def program_of(rec: dict) -> Program:
    sizes = dict(re.findall(r"\b(B|H|Hkv|N|M|D|Dv)=(\d+)", rec["describe"]))
    large = max(int(sizes["N"]), int(sizes["M"])) > 4096
    return Program(source=rec["source"], args=[ArgSpec(n, k, tuple(s), p) for n, k, s, p in rec["args"]],
                   dtype=getattr(torch, rec["dtype"].removeprefix("torch.")), seed=rec["seed"],
                   family=rec["family"], sizes=Sizes(**{k: int(v) for k, v in sizes.items()}), tags=rec["tags"],
                   grad=rec["grad"], second=rec["second"], ref_dtype=torch.float32 if large else torch.float64)


def main(argv: list[str]) -> None:
    recs = [r for r in map(json.loads, open(argv[0])) if r["status"] in ("mismatch", "crash")]
    picks = [int(a) for a in argv[1:] if a.isdigit()] or range(len(recs))
    for i in picks:
        rec = recs[i]
        out = run_case(program_of(rec), rec["backend"], rec["path"])
        print(f"[{i}] {rec['class']}\n    now: {out.status} {out.problems[:3]}")
        if "--show" in argv:
            print(rec["describe"], "\n", rec["args"], "\n", rec["source"], "\n", out.notes, out.reason)


if __name__ == "__main__":
    main(sys.argv[1:])
