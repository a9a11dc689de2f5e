"""Learning benchmark: qsm.py over envs × seeds against CleanRL SAC reference curves measured on the same machine kind.

    pip install -r benchmarks/requirements.txt
    python benchmarks/learning.py                              # Walker2d-v4 and Hopper-v4, seeds 1-3, 100k steps
    python benchmarks/learning.py --plot-only                  # redraw the picture and table from the CSVs

Runs `python qsm.py` with the defaults a user gets (plus --env-id, --seed, --total-timesteps), `--jobs` at a time,
each with one torch thread. Each run's curve (`charts/episodic_return` from its TensorBoard log) is written to
`benchmarks/results/{tag}_{env}_seed{seed}.csv` (env, seed, step, return) as soon as that run ends, so an interrupted
benchmark loses little: re-running skips every run whose CSV exists, collects runs that finished while no benchmark
process was watching, and continues an interrupted run from its last `checkpoint.pt` (qsm.py --resume; written every
`--checkpoint-freq` steps; MuJoCo episodes in flight at the interruption are cut, see README, Long runs). Then it draws
`benchmarks/learning_curves.png` and prints a Markdown table. Score (as in ../shared/reference/README.md): per seed,
the mean of the last 10 training episodes ending at or before the budget; then mean ± std over seeds.
"""
import argparse
import csv
import glob
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def events(run_dir: str, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return ea.Scalars(tag) if tag in ea.Tags()["scalars"] else []


def run_dirs(env, seed, o, finished=False) -> list[str]:
    dirs = sorted(glob.glob(str(Path(o.runs) / "runs" / f"{env.replace('/', '-')}__{o.tag}__{seed}__*")))
    return [d for d in dirs if max((e.step for e in events(d, "charts/SPS")), default=0) >= o.steps] if finished else dirs


def run_one(env, seed, o) -> str:
    out = Path(o.results) / f"{o.tag}_{env.replace('/', '-')}_seed{seed}.csv"
    if out.exists():
        return f"skip {out.name} (done)"
    finished = run_dirs(env, seed, o, finished=True)
    if not finished:
        ckpts = [f"{d}/checkpoint.pt" for d in run_dirs(env, seed, o) if os.path.exists(f"{d}/checkpoint.pt")]
        cmd = [sys.executable, o.qsm, *(["--resume", ckpts[-1]] if ckpts else [
            "--env-id", env, "--seed", str(seed), "--total-timesteps", str(o.steps), "--exp-name", o.tag,
            "--checkpoint-freq", str(o.checkpoint_freq), *o.extra.split()])]
        log = Path(o.runs) / f"{o.tag}_{env.replace('/', '-')}_seed{seed}.log"
        env_vars = dict(os.environ, OMP_NUM_THREADS=str(o.threads), MKL_NUM_THREADS=str(o.threads))
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=o.runs, env=env_vars, stdout=f, stderr=subprocess.STDOUT).returncode
        finished = run_dirs(env, seed, o, finished=True)
        if rc != 0 or not finished:
            return f"FAILED {env} seed {seed} (rc {rc}), see {log}; re-run to continue from its checkpoint"
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env", "seed", "step", "return"])
        for e in events(finished[-1], "charts/episodic_return"):
            w.writerow([env, seed, e.step, f"{e.value:.3f}"])
    tmp.rename(out)  # atomic: a CSV exists only for a finished run
    return f"done {out.name}"


def load(pattern):
    """{seed: (steps, returns)} from CSVs matching pattern."""
    curves = {}
    for f in sorted(glob.glob(pattern)):
        rows = list(csv.DictReader(open(f)))
        curves[int(rows[0]["seed"])] = (np.array([int(r["step"]) for r in rows]),
                                        np.array([float(r["return"]) for r in rows]))
    return curves


def score(steps, returns, budget, last=10):
    sel = returns[steps <= budget][-last:]
    return sel.mean() if len(sel) else np.nan


def summarize(o):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(5_000, o.steps + 1, 2_500)
    fig, axes = plt.subplots(1, len(o.envs), figsize=(6 * len(o.envs), 4.2), squeeze=False)
    rows = ["| env | budget | QSM (ours) | SAC (CleanRL) | QSM / SAC |", "|---|---|---|---|---|"]
    for ax, env in zip(axes[0], o.envs):
        qsm_label = "QSM (qsm.py defaults)" if o.tag == "qsm" else f"QSM ({o.tag})"
        algos = {qsm_label: load(str(Path(o.results) / f"{o.tag}_{env.replace('/', '-')}_seed*.csv")),
                 "SAC (CleanRL reference)": load(str(Path(o.reference_dir) / f"sac_{env}_seed*.csv"))}
        scores = {}
        for (name, curves), color in zip(algos.items(), ("tab:red", "tab:blue")):
            if not curves:
                continue
            s = np.array([[score(st, r, b) for b in grid] for st, r in curves.values()])
            m, sd = np.nanmean(s, 0), np.nanstd(s, 0)
            ax.plot(grid, m, color=color, label=f"{name}, {len(curves)} seed{'s' * (len(curves) > 1)}")
            ax.fill_between(grid, m - sd, m + sd, color=color, alpha=0.2)
            scores[name] = {b: [score(st, r, b) for st, r in curves.values()] for b in (o.steps // 2, o.steps)}
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("training episodic return (last 10 episodes)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        if len(scores) == 2:
            q, s = scores.values()
            for b in (o.steps // 2, o.steps):
                ratio = np.mean(q[b]) / np.mean(s[b])
                rows.append(f"| {env} | {b // 1000}k | {np.mean(q[b]):.0f} ± {np.std(q[b]):.0f} (n={len(q[b])}) | "
                            f"{np.mean(s[b]):.0f} ± {np.std(s[b]):.0f} (n={len(s[b])}) | {ratio:.2f} |")
    fig.suptitle(f"QSM (qsm.py) vs SAC (CleanRL), mean ± std over seeds, {o.threads} torch thread per run")
    fig.tight_layout()
    fig.savefig(o.picture or ROOT / "benchmarks" / ("learning_curves.png" if o.tag == "qsm" else f"{o.tag}_curves.png"),
                dpi=110)
    print("\n".join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["Walker2d-v4", "Hopper-v4"])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=100_000, help="env steps per run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--tag", default="qsm", help="--exp-name of the runs and prefix of their CSVs")
    p.add_argument("--extra", default="", help="extra qsm.py flags, e.g. '--q-grad-scale 10' (use a new --tag)")
    p.add_argument("--qsm", default=str(ROOT / "qsm.py"), help="the script to run (e.g. a frozen copy)")
    p.add_argument("--checkpoint-freq", type=int, default=5_000, help="qsm.py --checkpoint-freq of new runs")
    p.add_argument("--reference-dir", default=str(ROOT.parent / "shared" / "reference"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the CSVs")
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / ".runs"), help="folder of the runs' logs (not committed)")
    p.add_argument("--picture", default=None, help="the PNG to draw (default: benchmarks/learning_curves.png)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="only run (e.g. for a sweep under another --tag)")
    o = p.parse_args()
    Path(o.results).mkdir(parents=True, exist_ok=True)
    Path(o.runs).mkdir(parents=True, exist_ok=True)
    if not o.plot_only:
        jobs = [(env, seed) for seed in o.seeds for env in o.envs]
        with ThreadPoolExecutor(o.jobs) as pool:
            for msg in pool.map(lambda js: run_one(*js, o), jobs):
                print(msg, flush=True)
    if not o.no_plot:
        summarize(o)


if __name__ == "__main__":
    main()
