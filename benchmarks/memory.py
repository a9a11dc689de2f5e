"""Resident memory of one qsm.py run over its steps: does it stay flat once the replay buffer is allocated?

    python benchmarks/memory.py [--out CSV] -- --env-id Walker2d-v4 --total-timesteps 50000 --learning-starts 5000

Starts `python qsm.py <flags after -->` with one torch thread, reads its VmRSS from /proc every second and its step
from the progress bar, writes benchmarks/results/memory.csv (seconds, step, rss_mb) and prints a summary.
"""
import argparse
import csv
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


def main():
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.csv", help="the CSV to write")
    p.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / ".runs", help="where qsm.py runs (its runs/)")
    o, flags = p.parse_args(sys.argv[1:cut]), sys.argv[cut + 1:]
    out, run_dir = o.out, o.runs
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    run_dir.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, str(ROOT / "qsm.py"), "--exp-name", "memory", *flags], cwd=run_dir, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []
    threading.Thread(target=lambda: err.extend(iter(lambda: p.stderr.read(256), "")), daemon=True).start()
    rows, t0 = [], time.time()
    while p.poll() is None:
        steps = re.findall(r"(\d+)/\d+ \[", "".join(err[-8:]))
        try:
            rows.append((round(time.time() - t0, 1), int(steps[-1]) if steps else 0, round(rss_mb(p.pid), 1)))
        except (FileNotFoundError, ProcessLookupError, AttributeError):
            break
        time.sleep(1)
    p.wait()
    if p.returncode != 0 or not rows:  # a run that failed measures nothing: --out is left as it was
        last = [l for l in "".join(err).replace("\r", "\n").splitlines() if l.strip()][-1:] or ["(no output)"]
        sys.exit(f"memory.py: qsm.py exited with status {p.returncode}: {last[0][-300:]}; {out} is unchanged")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows([("seconds", "step", "rss_mb"), *rows])
    os.replace(tmp, out)
    total = max(r[1] for r in rows)
    at = lambda frac: next(r[2] for r in rows if r[1] >= frac * total)  # noqa: E731  (RSS when the run passed frac)
    print(f"qsm.py {' '.join(flags)}  (exit {p.returncode}, {len(rows)} samples, {out.name})")
    for frac in (0.1, 0.2, 0.4, 0.6, 0.8, 1.0):
        print(f"  step ≥ {int(frac * total):>7}: RSS {at(frac):7.1f} MB")
    late = [r[2] for r in rows if r[1] >= 0.2 * total]
    print(f"  from 20% of the run to the end: min {min(late):.1f} MB, max {max(late):.1f} MB, "
          f"growth {late[-1] - late[0]:+.1f} MB")


if __name__ == "__main__":
    main()
