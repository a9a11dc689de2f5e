"""Learning benchmark grid: envs × algorithms × seeds at one budget, run here or on a Slurm cluster; then a picture
per env, a table and the aggregate over envs and seeds (rliable: IQM and mean with 95% bootstrap intervals).

    python benchmarks/learning.py --envs Walker2d-v4 Hopper-v4 --algos qsm sac crossq --seeds 1 2 3 --steps 100000
    python benchmarks/learning.py ... --launcher slurm --partition cpu --time-min 240       # one Slurm job per run
    python benchmarks/learning.py --envs ... --algos ... --plot-only                       # table and pictures only

Algorithms: `qsm` runs `python qsm.py` with the defaults plus `--extra` flags (its CSVs are named by `--tag`,
default "qsm"); `sac`, `sac_zoo`, `td3` and `crossq` run Stable-Baselines3 / sb3-contrib (benchmarks/baselines.py).
Every run gets one torch thread; `--jobs` run at a time here (`--launcher local`), or each run is a Slurm job through
submitit (`--launcher slurm`; `submitit-local` runs the same jobs as local processes, which is how the tests drive it).

A run is identified by its algorithm, tag, flags, env, seed and budget: its folder in --runs is named by all of them,
so another budget or other flags never continue it. Its CSV, `{results}/{tag or algo}_{env}_seed{seed}.csv`
(env, seed, step, return, budget), is written only when the run reaches its budget, and tables read only CSVs of
the asked budget; the others, and unreadable ones, are listed in one line each. Score: per seed, the mean of the
last 10 training episodes ending at or before the budget. Aggregate: per env, scores divided by the mean of the
`--baseline` arm (default `sac`); over envs × seeds, IQM and mean with 95% stratified bootstrap confidence intervals,
and the probability that each arm improves on the baseline (Agarwal et al., NeurIPS 2021).

Resumable: re-running skips every finished run and continues an interrupted one from its checkpoint (written every
`--checkpoint-freq` steps and when the run is stopped). Ctrl-C or SIGTERM stops every run, each saving its checkpoint;
a run dies with this process (kill -9 included); one process per run (a file lock). On Slurm, a preempted or timed-
out job stops its run (which saves) and is requeued; the requeued job continues from the checkpoint. The exit status
is 0 only if every run finished.
"""
import argparse
import csv
import ctypes
import glob
import hashlib
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ["sac", "sac_utd2", "sac_zoo", "td3", "crossq"]  # benchmarks/baselines.py's arms
COLORS = {"qsm": "tab:red", "sac": "tab:blue", "sac_utd2": "tab:olive", "sac_zoo": "tab:cyan", "td3": "tab:green",
          "crossq": "tab:purple", "sac_cleanrl": "tab:gray"}


class Runner:
    """The runs in flight in this process, and whether Ctrl-C / SIGTERM came (then no new run starts). Pickled into a
    submitit job (with Job) as a new, empty one."""

    def __init__(self):
        self.stopping, self.procs = False, set()

    def __reduce__(self):
        return Runner, ()


RUNNER = Runner()


def events(run_dir: str, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    return ea.Scalars(tag) if tag in ea.Tags()["scalars"] else []


def name(algo: str, o) -> str:
    return o.tag if algo == "qsm" else algo


def label(n: str, o) -> str:
    return o.labels.get(n) or (n.upper() if n in BASELINES else n)


def color(n: str, o) -> str:
    """One color per arm, the same in every panel: the baselines' own, red for --tag, then the other arms in turn."""
    others = [a for a in o.arms if a not in COLORS and a != o.tag]
    palette = ["tab:orange", "tab:brown", "tab:olive", "tab:pink", "black"]
    return COLORS.get(n) or ("tab:red" if n == o.tag else palette[others.index(n) % 5] if n in others else "black")


def slug(env: str) -> str:  # the env id in file names, as qsm.py writes it in run folders
    return env.replace("/", "-")


def run_id(arm: str, env: str, seed: int) -> str:  # names the run's CSV and log; arm = name(algo, o)
    return f"{arm}_{slug(env)}_seed{seed}"


def csv_path(arm: str, env: str, seed: int, o) -> Path:
    return Path(o.results) / f"{run_id(arm, env, seed)}.csv"


def run_dir(algo: str, env: str, seed: int, o) -> Path:
    """The run's folder: named by everything that defines the run (flags by a digest), so nothing else resumes it."""
    flags = f"{o.qsm} {o.extra}" if algo == "qsm" else o.baseline_extra
    return Path(o.runs) / f"{run_id(name(algo, o), env, seed)}_{o.steps}_{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


def qsm_run_dirs(folder: Path, o, finished=False) -> list[str]:
    dirs = sorted(glob.glob(glob.escape(str(folder)) + "/runs/*"))
    return [d for d in dirs if max((e.step for e in events(d, "charts/SPS")), default=0) >= o.steps] if finished else dirs


def command(algo: str, env: str, seed: int, folder: Path, o) -> list[str]:
    """The command that starts, or continues, one run (it runs in its folder)."""
    if algo != "qsm":
        return [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--algo", algo, "--env-id", env, "--seed",
                str(seed), "--steps", str(o.steps), "--out", str(csv_path(name(algo, o), env, seed, o)), "--workdir",
                str(folder), "--checkpoint-freq", str(o.checkpoint_freq), *o.baseline_extra.split()]
    ckpts = [f"{d}/checkpoint.pt" for d in qsm_run_dirs(folder, o) if os.path.exists(f"{d}/checkpoint.pt")]
    if ckpts:
        return [sys.executable, o.qsm, "--resume", ckpts[-1]]
    return [sys.executable, o.qsm, "--env-id", env, "--seed", str(seed), "--total-timesteps", str(o.steps),
            "--exp-name", o.tag, "--checkpoint-freq", str(o.checkpoint_freq), *o.extra.split()]


def child_setup(ignore_usr2: bool):
    """In the run's process, before it starts: its own process group (a Ctrl-C reaches it once, through us), death
    with this process (PR_SET_PDEATHSIG: SIGTERM, on which it saves), and, in a submitit job, SIGUSR2 ignored (Slurm
    may send it to every process of a preempted job; submitit stops the run through Job.checkpoint)."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if ignore_usr2:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def budget_of(path: Path):
    """The budget a finished run's CSV records, or a one-line reason why it cannot be read."""
    try:
        with open(path) as f:
            first = next(csv.DictReader(f), None)
        return int(first["budget"]) if first else "holds no episode"
    except (OSError, KeyError, TypeError, ValueError, csv.Error) as e:
        return f"is unreadable ({type(e).__name__}: {e})"


def run_one(algo: str, env: str, seed: int, o, started=None) -> str:
    """started(proc): called with the run's process (submitit jobs stop it through this)."""
    out = csv_path(name(algo, o), env, seed, o)
    if out.exists():
        b = budget_of(out)
        return f"skip {out.name} (done)" if b == o.steps else \
            f"FAILED {out.name}: it {b if isinstance(b, str) else f'holds a run of {b} steps'}, not of {o.steps}; " \
            f"use another --results or --tag"
    folder = run_dir(algo, env, seed, o)
    folder.mkdir(parents=True, exist_ok=True)
    finished = qsm_run_dirs(folder, o, finished=True) if algo == "qsm" else []  # QSM runs that ended unwatched
    if algo != "qsm" or not finished:
        if RUNNER.stopping:
            return f"not started {out.stem} (stopped)"
        cmd = command(algo, env, seed, folder, o)
        log = Path(o.runs) / f"{out.stem}.log"  # out.stem is the run_id
        env_vars = dict(os.environ, OMP_NUM_THREADS=str(o.threads), MKL_NUM_THREADS=str(o.threads))
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=folder, env=env_vars, stdout=f, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: child_setup(started is not None))
            RUNNER.procs.add(proc)
            if started:
                started(proc)
            rc = proc.wait()
            RUNNER.procs.discard(proc)
        if RUNNER.stopping and rc != 0:  # stopped by Ctrl-C or SIGTERM: the run has saved its checkpoint
            return f"stopped {out.stem}: run the same command again to continue it"
        finished = qsm_run_dirs(folder, o, finished=True) if algo == "qsm" else []
        if rc != 0 or not (finished if algo == "qsm" else out.exists()):
            last = next((l for l in reversed(log.read_text(errors="replace").splitlines()) if l.strip()), "")
            return f"FAILED {out.stem} (exit {rc}: {last[-200:]}), see {log}; re-run to continue from its checkpoint"
    if algo == "qsm":  # the curve from the finished run's TensorBoard log
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["env", "seed", "step", "return", "budget"])
            for e in events(finished[-1], "charts/episodic_return"):
                w.writerow([env, seed, e.step, f"{e.value:.3f}", o.steps])
        os.replace(tmp, out)  # atomic: a CSV exists only for a finished run
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


def launch(runs: list[tuple[str, str, int]], o) -> list[str]:
    if o.launcher == "local":
        with ThreadPoolExecutor(o.jobs) as pool:
            results = []
            for msg in pool.map(lambda r: run_one(*r, o), runs):
                print(msg, flush=True)
                results.append(msg)
        return results
    import submitit

    cluster = "local" if o.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=Path(o.runs) / "submitit" / "%j", cluster=cluster,
                                     **{f"{cluster}_max_num_timeout": o.max_requeue})
    params = dict(timeout_min=o.time_min, cpus_per_task=o.threads)
    if cluster == "slurm":
        params.update(slurm_partition=o.partition, slurm_array_parallelism=o.jobs,
                      slurm_additional_parameters=dict(x.split("=", 1) for x in o.slurm_extra))
    executor.update_parameters(**params)
    with executor.batch():  # one Slurm job array
        jobs = [executor.submit(Job(*r, o)) for r in runs]
    print(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs)}; logs in {Path(o.runs) / 'submitit'}",
          flush=True)
    if not o.wait:
        return []
    results = []
    for job in jobs:
        try:
            results.append(job.result())
        except Exception as e:  # submitit's failed job: its error's last line
            results.append(f"FAILED job {job.job_id}: {str(e).strip().splitlines()[-1][-300:]}")
        print(results[-1], flush=True)
    return results


# --- scores, table, pictures and the aggregate --------------------------------------------------------------------
def load(names: list[str], env: str, o, notes: list[str]) -> dict:
    """{name: {seed: (steps, returns)}} from the finished runs of the asked seeds and budget; every CSV of an asked
    seed left out gets a note."""
    curves = {}
    for n in names:
        for seed in o.seeds:
            path = csv_path(n, env, seed, o)
            if not path.exists():
                continue  # the caller notes the missing seeds
            try:
                rows = list(csv.DictReader(open(path)))
                if not rows or int(rows[0]["budget"]) != o.steps:
                    notes.append(f"{path.name}: {'holds no episode' if not rows else 'a run of ' + rows[0]['budget'] + ' steps'}")
                    continue
                curves.setdefault(n, {})[seed] = (np.array([int(r["step"]) for r in rows]),
                                                  np.array([float(r["return"]) for r in rows]))
            except (OSError, KeyError, TypeError, ValueError, IndexError, csv.Error) as e:
                notes.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
    return curves


def score(steps, returns, budget, last=10):
    sel = returns[steps <= budget][-last:]
    return sel.mean() if len(sel) else np.nan


def aggregate(per_env: dict, names: list[str], o) -> tuple[list[str], dict]:
    """rliable over envs × seeds, scores normalised by the baseline's mean per env."""
    from rliable import library as rly, metrics

    envs = [e for e in per_env if o.baseline in per_env[e]]
    seeds = min((len(per_env[e][o.baseline]) for e in envs), default=0)  # rliable needs runs × tasks: the baseline's
    arms = [n for n in names if envs and all(len(per_env[e].get(n, [])) >= seeds for e in envs)]
    if o.baseline not in arms:
        return [f"aggregate: {o.baseline} has no finished runs at this budget"], {}
    norm = {n: np.array([np.array(per_env[e][n][:seeds]) / np.mean(per_env[e][o.baseline]) for e in envs]).T
            for n in arms}
    np.random.seed(0)  # rliable's bootstrap draws from numpy's global generator: the same intervals on every call
    est, ci = rly.get_interval_estimates(
        norm, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), reps=o.reps)
    others = [n for n in arms if n != o.baseline]
    np.random.seed(1)
    poi, poi_ci = rly.get_interval_estimates({n: (norm[n], norm[o.baseline]) for n in others},
                                             metrics.probability_of_improvement, reps=o.reps) if others else ({}, {})
    left = [n for n in names if n not in arms]
    lines = [f"Aggregate over {len(envs)} envs × {seeds} seeds ({', '.join(envs)}), scores / {o.baseline}'s mean per "
             f"env, 95% stratified bootstrap CIs ({o.reps} resamples){'; without ' + ', '.join(left) + ' (fewer runs)' if left else ''}:", "",
             f"| arm | IQM | mean | P(arm > {o.baseline}) |", "|---|---|---|---|"]
    for n in arms:
        p = f"{poi[n]:.2f} [{poi_ci[n][0, 0]:.2f}, {poi_ci[n][1, 0]:.2f}]" if n in poi else "–"
        lines.append(f"| {label(n, o)} | {est[n][0]:.2f} [{ci[n][0, 0]:.2f}, {ci[n][1, 0]:.2f}] | {est[n][1]:.2f} "
                     f"[{ci[n][0, 1]:.2f}, {ci[n][1, 1]:.2f}] | {p} |")
    return lines, {n: (est[n], ci[n]) for n in arms}


def summarize(o) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(5_000, o.steps + 1, 2_500) if o.steps >= 10_000 else np.linspace(o.steps / 4, o.steps, 4)
    fig, axes = plt.subplots(1, len(o.envs) + 1, figsize=(5.5 * (len(o.envs) + 1), 4.2), squeeze=False)
    names = list(dict.fromkeys([name(a, o) for a in o.algos] + o.arms))
    header = f"| env | budget | {' | '.join(names)} |"
    rows, notes, per_seed, per_env = [header, "|" + "---|" * (header.count("|") - 1)], [], [], {}
    for ax, env in zip(axes[0], o.envs):
        curves, scores = load(names, env, o, notes), {}
        for n in names:
            c = curves.get(n)
            if not c:
                continue
            s = np.array([[score(st, r, b) for b in grid] for st, r in c.values()])
            m, sd = np.nanmean(s, 0), np.nanstd(s, 0)
            ax.plot(grid, m, color=color(n, o), label=f"{label(n, o)}, {len(c)} seed{'s' * (len(c) > 1)}")
            ax.fill_between(grid, m - sd, m + sd, color=color(n, o), alpha=0.15)
            scores[n] = {b: [score(st, r, b) for st, r in c.values()] for b in (o.steps // 2, o.steps)}
        ax.set(title=env, xlabel="transitions (env steps)", ylabel="training episodic return (last 10 episodes)")
        ax.grid(alpha=0.3)
        if scores:
            ax.legend(loc="upper left", fontsize=8)
        for b in (o.steps // 2, o.steps):
            cell = lambda n: f"{np.mean(scores[n][b]):.0f} ± {np.std(scores[n][b]):.0f} (n={len(scores[n][b])})" \
                if n in scores else "–"
            rows.append(f"| {env} | {b / 1000:g}k | " + " | ".join(cell(n) for n in names) + " |")
        per_seed.append(f"{env} at {o.steps / 1000:g}k, per seed: " + "; ".join(
            f"{n} " + ", ".join(f"{v:.0f}" for v in scores[n][o.steps]) for n in names if n in scores))
        per_env[env] = {n: scores[n][o.steps] for n in scores}
        missing = [f"{n} seed {s}" for n in names for s in o.seeds if s not in curves.get(n, {})]
        if missing:
            notes.append(f"{env}: missing {', '.join(missing)}")
    agg_lines, agg = aggregate(per_env, names, o)
    ax = axes[0][-1]
    for i, (n, (est, ci)) in enumerate(agg.items()):
        for j, metric in enumerate(("IQM", "mean")):
            y = i + 0.2 * (j - 0.5)
            ax.errorbar(est[j], y, xerr=[[est[j] - ci[0, j]], [ci[1, j] - est[j]]], fmt="o" if j == 0 else "s",
                        color=color(n, o), capsize=3,
                        label=metric if i == 0 else None)
    ax.set(yticks=range(len(agg)), yticklabels=[label(n, o) for n in agg],
           xlabel=f"score / {o.baseline}'s mean per env", title=f"aggregate over envs × seeds (95% CI)")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    if agg:
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{', '.join(label(n, o) for n in names)}: mean ± std over seeds, {o.threads} torch thread per run")
    fig.tight_layout()
    fig.savefig(o.picture or ROOT / "benchmarks" / f"{o.tag}_curves.png", dpi=100)
    lines = rows + [""] + per_seed + [""] + agg_lines + ([""] + [f"left out: {n}" for n in notes] if notes else [])
    print("\n".join(lines), flush=True)
    return lines


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
    p.add_argument("--arms", nargs="*", default=[], help="more CSV prefixes to score and draw (e.g. qsm_official "
                   "sac_cleanrl)")
    p.add_argument("--baseline", default="sac", help="the arm that scores are normalised by in the aggregate")
    p.add_argument("--reps", type=int, default=2_000, help="bootstrap resamples of the aggregate's intervals")
    p.add_argument("--checkpoint-freq", type=int, default=5_000, help="checkpoint every this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and Slurm CPUs) per run")
    p.add_argument("--launcher", default="local", choices=["local", "slurm", "submitit-local"])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (local), or Slurm array parallelism")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time-min", type=int, default=240, help="Slurm time limit per job, minutes (requeued beyond)")
    p.add_argument("--max-requeue", type=int, default=10, help="times a job may be requeued after a time-out")
    p.add_argument("--slurm-extra", nargs="*", default=[], help="more sbatch options, e.g. account=myproject")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="Slurm: submit and return")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder of the CSVs")
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / ".runs"), help="folder of the runs (not committed)")
    p.add_argument("--picture", default=None, help="the PNG to draw (default: benchmarks/{tag}_curves.png)")
    p.add_argument("--labels", nargs="*", default=[], metavar="ARM=NAME",
                   help="names of arms in the picture and the aggregate, e.g. cand_utd2_on=defaults")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--no-plot", action="store_true", help="only run")
    o = p.parse_args(argv)
    for flag, value, low in (("--jobs", o.jobs, 1), ("--steps", o.steps, 1), ("--threads", o.threads, 1),
                             ("--checkpoint-freq", o.checkpoint_freq, 0), ("--reps", o.reps, 1)):
        if value < low:
            p.error(f"{flag} must be ≥ {low} (got {value})")
    if bad := [x for x in o.labels if "=" not in x]:
        p.error(f"--labels takes ARM=NAME (got {', '.join(bad)})")
    o.labels = dict(x.split("=", 1) for x in o.labels)
    if os.sep in o.tag or not o.tag:
        p.error(f"--tag must be a non-empty name without {os.sep}")
    o.envs, o.algos, o.seeds = (list(dict.fromkeys(x)) for x in (o.envs, o.algos, o.seeds))  # each run once
    o.runs, o.results, o.qsm = (str(Path(x).resolve()) for x in (o.runs, o.results, o.qsm))  # runs start in o.runs
    try:
        Path(o.results).mkdir(parents=True, exist_ok=True)
        Path(o.runs).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"cannot make the folders of results and runs: {e}")
    return o


def stop(signum, frame):
    """Ctrl-C or SIGTERM: start nothing more, stop every run (each saves its checkpoint), then exit."""
    if RUNNER.stopping:
        return
    RUNNER.stopping = True
    print(f"\nlearning.py: {signal.Signals(signum).name}: stopping {len(RUNNER.procs)} run(s); each saves its "
          f"checkpoint", file=sys.stderr, flush=True)
    for proc in list(RUNNER.procs):
        proc.send_signal(signal.SIGTERM)


def main():
    o = options()
    results = []
    if not o.plot_only:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, stop)
        results = launch([(algo, env, seed) for seed in o.seeds for env in o.envs for algo in o.algos], o)
        if RUNNER.stopping:
            sys.exit("learning.py: stopped; run the same command again to continue from the checkpoints")
    if not o.no_plot:
        summarize(o)
    failed = [r for r in results if r.startswith("FAILED")]
    if failed:
        sys.exit(f"learning.py: {len(failed)} of {len(results)} runs failed (listed above)")


if __name__ == "__main__":
    main()
