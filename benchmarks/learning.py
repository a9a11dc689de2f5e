"""Learning benchmark grid: envs × algorithms × seeds at one budget, run here or on a Slurm cluster; then a picture
per env and a table.

    pip install -r benchmarks/requirements.txt
    python benchmarks/learning.py --envs Walker2d-v4 Hopper-v4 --algos qsm sac td3 --seeds 1 2 3 --steps 100000
    python benchmarks/learning.py ... --launcher slurm --partition cpu --time-min 240       # one Slurm job per run
    python benchmarks/learning.py --envs ... --algos ... --plot-only                       # redraw from the CSVs

Algorithms: `qsm` runs `python qsm.py` with the defaults a user gets plus `--extra` flags (its CSVs are named by
`--tag`, default "qsm"); `sac` and `td3` run Stable-Baselines3 with the zoo's published settings
(benchmarks/baselines.py). Every run gets one torch thread; `--jobs` run at a time here (`--launcher local`), or each
run is a Slurm job through submitit (`--launcher slurm`; `submitit-local` runs the same jobs as local processes, which
is how the tests check the launcher).

Metric, the same for all: the training return of each finished episode, at the number of transitions collected when
it ended, written to `{results}/{tag or algo}_{env}_seed{seed}.csv` (env, seed, step, return) as soon as the run ends.
Score: per seed, the mean of the last 10 training episodes ending at or before the budget; then mean ± std over seeds.

Resumable: re-running skips every run whose CSV exists, collects QSM runs that finished while nothing watched, and
continues an interrupted run from its checkpoint (written every `--checkpoint-freq` steps and when the run gets
SIGTERM; episodes in flight are cut). On Slurm, a job that is preempted or reaches its time limit is signalled by
submitit, stops its run (which saves a checkpoint), and is requeued; the requeued job continues from the checkpoint.
"""
import argparse
import csv
import glob
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["sac", "sac_zoo", "td3", "crossq"]  # benchmarks/baselines.py's arms
COLORS = {"qsm": "tab:red", "sac": "tab:blue", "sac_zoo": "tab:cyan", "td3": "tab:green", "crossq": "tab:purple",
          "sac (CleanRL)": "tab:gray"}


def events(run_dir: str, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return ea.Scalars(tag) if tag in ea.Tags()["scalars"] else []


def name(algo: str, o) -> str:
    return o.tag if algo == "qsm" else algo


def label(n: str, o) -> str:
    return {o.tag: f"QSM ({o.tag})", "qsm": "QSM", "sac (CleanRL)": "SAC (CleanRL)"}.get(n, n.upper())


def slug(env: str) -> str:  # the env id in file names, as qsm.py writes it in run folders
    return env.replace("/", "-")


def run_id(algo: str, env: str, seed: int, o) -> str:  # names the run's CSV, log and (baselines) working folder
    return f"{name(algo, o)}_{slug(env)}_seed{seed}"


def csv_path(algo: str, env: str, seed: int, o) -> Path:
    return Path(o.results) / f"{run_id(algo, env, seed, o)}.csv"


def qsm_run_dirs(env, seed, o, finished=False) -> list[str]:
    dirs = sorted(glob.glob(str(Path(o.runs) / "runs" / f"{slug(env)}__{o.tag}__{seed}__*")))
    return [d for d in dirs if max((e.step for e in events(d, "charts/SPS")), default=0) >= o.steps] if finished else dirs


def command(algo: str, env: str, seed: int, o) -> list[str]:
    """The command that starts, or continues, one run."""
    if algo != "qsm":
        return [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--algo", algo, "--env-id", env, "--seed",
                str(seed), "--steps", str(o.steps), "--out", str(csv_path(algo, env, seed, o)), "--workdir",
                str(Path(o.runs) / f"{run_id(algo, env, seed, o)}_{o.steps}"), "--checkpoint-freq",
                str(o.checkpoint_freq), *o.baseline_extra.split()]
    ckpts = [f"{d}/checkpoint.pt" for d in qsm_run_dirs(env, seed, o) if os.path.exists(f"{d}/checkpoint.pt")]
    if ckpts:
        return [sys.executable, o.qsm, "--resume", ckpts[-1]]
    return [sys.executable, o.qsm, "--env-id", env, "--seed", str(seed), "--total-timesteps", str(o.steps),
            "--exp-name", o.tag, "--checkpoint-freq", str(o.checkpoint_freq), *o.extra.split()]


def run_one(algo: str, env: str, seed: int, o, started=None) -> str:
    """started(proc): called with the run's process (submitit jobs stop it through this)."""
    out = csv_path(algo, env, seed, o)
    if out.exists():
        return f"skip {out.name} (done)"
    finished = qsm_run_dirs(env, seed, o, finished=True) if algo == "qsm" else []  # QSM runs that ended unwatched
    if algo != "qsm" or not finished:
        cmd = command(algo, env, seed, o)
        log = Path(o.runs) / f"{run_id(algo, env, seed, o)}.log"
        env_vars = dict(os.environ, OMP_NUM_THREADS=str(o.threads), MKL_NUM_THREADS=str(o.threads))
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            # in a submitit job the run ignores SIGUSR2: Slurm may send it to every process of a preempted job,
            # and the job (submitit) stops the run with SIGTERM, which saves a checkpoint, before requeueing
            ignore_usr2 = (lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)) if started else None
            proc = subprocess.Popen(cmd, cwd=o.runs, env=env_vars, stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=ignore_usr2)
            if started:
                started(proc)
            rc = proc.wait()
        finished = qsm_run_dirs(env, seed, o, finished=True) if algo == "qsm" else []  # read once, reused below
        if rc != 0 or not (finished if algo == "qsm" else out.exists()):
            return f"FAILED {out.stem} (rc {rc}), see {log}; re-run to continue from its checkpoint"
    if algo == "qsm":  # the curve from the finished run's TensorBoard log
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env", "seed", "step", "return"])
            for e in events(finished[-1], "charts/episodic_return"):
                w.writerow([env, seed, e.step, f"{e.value:.3f}"])
        tmp.rename(out)  # atomic: a CSV exists only for a finished run
    return f"done {out.name}"


class Job:
    """One run as a submitit job. On preemption or time-out submitit calls checkpoint(): it stops the run with
    SIGTERM (the run saves its checkpoint and exits) and requeues this job, which then continues from the checkpoint."""

    def __init__(self, algo: str, env: str, seed: int, o):
        self.algo, self.env, self.seed, self.o, self.proc = algo, env, seed, o, None

    def __call__(self) -> str:
        return run_one(self.algo, self.env, self.seed, self.o, started=lambda proc: setattr(self, "proc", proc))

    def checkpoint(self, *args, **kwargs):
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            os.waitpid(self.proc.pid, 0)  # not proc.wait(): the interrupted proc.wait() in run_one holds its lock
        return submitit.helpers.DelayedSubmission(Job(self.algo, self.env, self.seed, self.o))


def launch(runs: list[tuple[str, str, int]], o):
    if o.launcher == "local":
        with ThreadPoolExecutor(o.jobs) as pool:
            for msg in pool.map(lambda r: run_one(*r, o), runs):
                print(msg, flush=True)
        return
    import submitit

    executor = submitit.AutoExecutor(folder=Path(o.runs) / "submitit" / "%j",
                                     cluster="local" if o.launcher == "submitit-local" else "slurm")
    executor.update_parameters(timeout_min=o.time_min, cpus_per_task=o.threads, slurm_partition=o.partition,
                               slurm_array_parallelism=o.jobs, slurm_max_num_timeout=o.max_requeue,
                               slurm_additional_parameters=dict(x.split("=", 1) for x in o.slurm_extra))
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(Job(*r, o)) for r in runs]
    print(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs)}; logs in {Path(o.runs) / 'submitit'}",
          flush=True)
    if o.wait:
        for job in jobs:
            print(job.result(), flush=True)


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

    grid = np.arange(5_000, o.steps + 1, 2_500) if o.steps >= 10_000 else np.linspace(o.steps / 4, o.steps, 4)
    fig, axes = plt.subplots(1, len(o.envs), figsize=(6 * len(o.envs), 4.2), squeeze=False)
    names = [name(a, o) for a in o.algos] + (["sac (CleanRL)"] if o.reference_dir else [])
    rows = ["| env | budget | " + " | ".join(names) + " | " + " | ".join(f"QSM / {a.upper()}" for a in o.algos
                                                                       if a != "qsm") + " |"]
    rows.append("|" + "---|" * (rows[0].count("|") - 1))
    per_seed = []
    for ax, env in zip(axes[0], o.envs):
        e = slug(env)
        curves = {n: load(str(Path(o.results) / f"{n}_{e}_seed*.csv")) for n in names if n != "sac (CleanRL)"}
        if o.reference_dir:
            curves["sac (CleanRL)"] = load(str(Path(o.reference_dir) / f"sac_{e}_seed*.csv"))
        scores = {}
        for n, c in curves.items():
            if not c:
                continue
            s = np.array([[score(st, r, b) for b in grid] for st, r in c.values()])
            m, sd = np.nanmean(s, 0), np.nanstd(s, 0)
            color = COLORS.get(n, COLORS["qsm"] if n == o.tag else None)
            ax.plot(grid, m, color=color, label=f"{label(n, o)}, {len(c)} seed{'s' * (len(c) > 1)}")
            ax.fill_between(grid, m - sd, m + sd, color=color, alpha=0.15)
            scores[n] = {b: [score(st, r, b) for st, r in c.values()] for b in (o.steps // 2, o.steps)}
        ax.set(title=env, xlabel="transitions (env steps)", ylabel="training episodic return (last 10 episodes)")
        ax.grid(alpha=0.3)
        if scores:
            ax.legend(loc="upper left")
        for b in (o.steps // 2, o.steps):
            cell = lambda n: f"{np.mean(scores[n][b]):.0f} ± {np.std(scores[n][b]):.0f} (n={len(scores[n][b])})" \
                if n in scores else "–"
            q = scores.get(o.tag if "qsm" in o.algos else None, {}).get(b)
            ratios = [f"{np.mean(q) / np.mean(scores[name(a, o)][b]):.2f}" if q and name(a, o) in scores else "–"
                      for a in o.algos if a != "qsm"]
            rows.append(f"| {env} | {b / 1000:g}k | " + " | ".join(cell(n) for n in names) + " | " + " | ".join(ratios) + " |")
        per_seed.append(f"{env} at {o.steps / 1000:g}k, per seed: " + "; ".join(
            f"{n} " + ", ".join(f"{v:.0f}" for v in scores[n][o.steps]) for n in names if n in scores))
    fig.suptitle(f"{', '.join(label(n, o) for n in names)}: mean ± std over seeds, {o.threads} torch thread per run")
    fig.tight_layout()
    fig.savefig(o.picture or ROOT / "benchmarks" / f"{o.tag}_curves.png", dpi=110)
    print("\n".join(rows + [""] + per_seed))


def options(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=["Walker2d-v4", "Hopper-v4"])
    p.add_argument("--algos", nargs="+", default=["qsm"], choices=["qsm", *BASELINES])
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=100_000, help="transitions per run")
    p.add_argument("--tag", default="qsm", help="--exp-name of the QSM runs and prefix of their CSVs")
    p.add_argument("--extra", default="", help="extra qsm.py flags, e.g. '--q-grad-scale 50' (use a new --tag)")
    p.add_argument("--baseline-extra", default="", help="extra baselines.py flags (tests only)")
    p.add_argument("--qsm", default=str(ROOT / "qsm.py"), help="the script to run (e.g. a frozen copy)")
    p.add_argument("--checkpoint-freq", type=int, default=5_000, help="checkpoint every this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Slurm CPUs) per run")
    p.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (local), or Slurm array parallelism")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time-min", type=int, default=240, help="Slurm time limit per job, minutes (requeued beyond)")
    p.add_argument("--max-requeue", type=int, default=10, help="Slurm: times a job may be requeued after a time-out")
    p.add_argument("--slurm-extra", nargs="*", default=[], help="more sbatch options, e.g. account=myproject")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="Slurm: submit and return")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the CSVs")
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / ".runs"), help="folder of the runs (not committed)")
    p.add_argument("--picture", default=None, help="the PNG to draw (default: benchmarks/{tag}_curves.png)")
    p.add_argument("--reference-dir", default=str(ROOT.parent / "shared" / "reference"),
                   help="CleanRL SAC curves to draw as a second reference ('' for none)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="only run")
    o = p.parse_args(argv)
    o.runs, o.results, o.qsm = (str(Path(x).resolve()) for x in (o.runs, o.results, o.qsm))  # runs start in o.runs
    Path(o.results).mkdir(parents=True, exist_ok=True)
    Path(o.runs).mkdir(parents=True, exist_ok=True)
    return o


def main():
    o = options()
    if not o.plot_only:
        launch([(algo, env, seed) for seed in o.seeds for env in o.envs for algo in o.algos], o)
    if not o.no_plot:
        summarize(o)


if __name__ == "__main__":
    main()
