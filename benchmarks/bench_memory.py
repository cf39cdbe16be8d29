"""Peak memory of extraction at 1k vs 10k images: streaming keeps it flat.

Makes N distinct photos from a data set (the originals, then mirrored and rotated copies
re-encoded as JPEG, so every file is new content), runs `cnncodes extract` on the first 1,000
and on all N in fresh processes, and prints each one's peak RSS (the main process, and the
largest decoding worker) and the ratio.

    python benchmarks/bench_memory.py ../shared/datasets/flowers5 --n 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs

CHILD = """
import json, resource, sys, time
from cnncodes import extract
t0 = time.perf_counter()
r = extract(sys.argv[1], out=sys.argv[2], layers=["block4", "block5"], progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": r.n_rows,
                  "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_photos(src: Path, dst: Path, n: int) -> int:
    """Write n distinct photos under dst/<class>/ from the photos of src."""
    from PIL import Image

    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    variants = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM]
    made = 0
    for variant in variants:
        for f in files:
            if made == n:
                return made
            target = dst / f.parent.name / f"{f.stem}-{'orig' if variant is None else variant.name.lower()}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            if variant is None:
                shutil.copy(f, target)
            else:
                Image.open(f).convert("RGB").transpose(variant).save(target, quality=92)
            made += 1
    return made


def run(folder: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--small", type=int, default=1_000)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cnncodes-mem-"))
    t0 = time.perf_counter()
    n = make_photos(args.data, work / "big", args.n)
    small = make_photos(args.data, work / "small", args.small)
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {small} and {n} distinct photos made in "
          f"{time.perf_counter() - t0:.0f} s; layers block4 + block5, default settings")
    print(f"# command: python benchmarks/bench_memory.py {args.data} --n {args.n}")
    rows = [(small, run(work / "small", work / "small.h5")), (n, run(work / "big", work / "big.h5"))]
    base = rows[0][1]["self_kb"]
    print("| images | rows | seconds | peak RSS, main process | largest worker | vs smallest |")
    print("|---|---|---|---|---|---|")
    for count, r in rows:
        print(f"| {count:,} | {r['rows']:,} | {r['seconds']:.1f} | {r['self_kb']:,} KB | "
              f"{r['workers_kb']:,} KB | {r['self_kb'] / base:.3f}x |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
