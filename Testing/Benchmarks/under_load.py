"""How much slower FMOneShot gets when other processes keep every core busy (issue 20; target: at most 2x).

Runs a command (by default the demo, ``fmoneshot demo``, in a fresh process each time) alternately on the
machine as it is ("idle") and with one busy-looping process per core started beside it ("loaded"), several
times, and prints every time, the median of each condition and their ratio. Alternating keeps slow drifts of
the machine's own background load out of the ratio; that background load is printed too, since on a shared
machine "idle" is not idle.

    python3 Testing/Benchmarks/under_load.py                  # the demo, 3 rounds
    python3 Testing/Benchmarks/under_load.py --rounds 1 -- python3 -m pytest -q -x Testing/Python/test_cli.py
    CI=true python3 Testing/Benchmarks/under_load.py --rounds 1 --no-warm-up -- python3 -m pytest -q   # the suite

Where Linux's autogroup scheduling is on (most desktop distributions), CPU time is shared fairly between
sessions first, then between the processes of a session. Busy processes started in their own session (the
default here) stand for another program: a notebook, Slicer, a colleague's job. With ``--same-session`` they
share the command's session, so the command gets a third of that session's share on 2 cores whatever its
threads do: that measures the scheduler, not FMOneShot.

Exit status 0 when the ratio is at most --target, 1 otherwise. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUSY = "while True: pass"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def autogroup() -> str:
    try:
        flag = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text(encoding="utf-8").strip()
        return "on" if flag == "1" else "off"
    except OSError:
        return "not available"


def timed(command: list, env: dict) -> float:
    """Seconds ``command`` took (wall clock); when it fails, prints the last 40 lines of its output (what failed)
    and raises CalledProcessError."""
    t = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode:
        print("\n".join(done.stdout.decode("utf-8", "replace").splitlines()[-40:]), file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, command)
    return time.perf_counter() - t


def run(command: list, loaded: bool, busy: int, env: dict, same_session: bool) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=not same_session)
             for _ in range(busy)] if loaded else []
    try:
        return timed(command, env)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="idle + loaded runs each (default: %(default)s)")
    p.add_argument("--busy", type=int, default=os.cpu_count() or 1,
                   help="busy-looping processes while loaded (default: one per core, %(default)s)")
    p.add_argument("--same-session", action="store_true",
                   help="start the busy processes in this session rather than in their own (see below)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip the uncounted first run that warms the file cache (for long commands: the test suite)")
    p.add_argument("--target", type=float, default=2.0, help="the ratio to stay under (default: %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="command to time after --, run in the repository root (default: the demo)")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [c for c in args.command if c != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        if not command:
            command = [sys.executable, "-m", "FMOneShotLib.cli", "demo", "--output", str(Path(tmp) / "demo"),
                       "--force"]
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores; background load average "
              f"{os.getloadavg()[0]:.1f} at the start; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"command: {' '.join(command)}")
        print(f"loaded: {args.busy} busy-looping processes beside it, in "
              f"{'the same session' if args.same_session else 'a session of their own'}; Linux's autogroup "
              f"scheduling is {autogroup()}")
        if not args.no_warm_up:
            timed(command, env)  # warm the file cache; not counted
        times = {False: [], True: []}
        for r in range(args.rounds):
            for loaded in (False, True):
                times[loaded].append(run(command, loaded, args.busy, env, args.same_session))
                print(f"  round {r + 1} {'loaded' if loaded else 'idle  '} {times[loaded][-1]:7.2f} s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    idle, loaded = statistics.median(times[False]), statistics.median(times[True])
    ratio = loaded / idle
    print(f"median idle {idle:.2f} s, loaded {loaded:.2f} s: ratio {ratio:.2f} "
          f"({'within' if ratio <= args.target else 'ABOVE'} the target {args.target:g})")
    return 0 if ratio <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
