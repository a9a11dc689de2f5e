"""Tests of the benchmark scripts, driven as a user drives them (tiny runs; a subprocess where a run, a signal or a
launcher needs one, else the script's main() in this process): every script runs on a tiny setting, so that a change
of qsm.py breaks a test, not a benchmark; and no run is lost or misreported."""
import contextlib
import csv
import fcntl
import glob
import importlib.util
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402
from test_qsm import small_args, wait_for  # noqa: E402

TINY = ("--learning-starts 100 --batch-size 32 --actor-hidden-dims 32 32 --critic-hidden-dims 32 32 --diffusion-steps 5 "
        "--no-compile")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def bench(script: str, *args: str, rc: int = 0, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=300, env=ENV, cwd=cwd)
    assert p.returncode == rc, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def script(name: str, *args: str, rc: int = 0) -> subprocess.CompletedProcess:
    """benchmarks/{name}'s main() run in this process, as `python benchmarks/{name} args` would (a subprocess would
    import torch again: seconds each); exit status and output as bench() gives them."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "argv", [name, *args])
        try:
            module.main()
        except SystemExit as e:
            code = e.code or 0
            if isinstance(e.code, str):  # sys.exit("message") prints the message and exits with status 1
                print(e.code, file=sys.stderr)
                code = 1
    assert code == rc, out.getvalue()[-2000:] + err.getvalue()[-3000:]
    return subprocess.CompletedProcess([name, *args], code, out.getvalue(), err.getvalue())


def last_line(p) -> str:
    lines = [l for l in p.stderr.splitlines() if l.strip() and "Warn" not in l and "logger." not in l]
    assert len(lines) == 1, p.stderr[-2000:]  # one line, no traceback
    return lines[0]


def grid_flags(tmp_path, *algos, steps=400, seeds=("1",), tag="qsm", baseline_learning_starts=300) -> list[str]:
    return ["--envs", "Pendulum-v1", "--algos", *algos, "--seeds", *seeds, "--steps", str(steps), "--jobs", "2",
            "--checkpoint-freq", "200", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
            "--picture", str(tmp_path / "curves.png"), "--extra", TINY, "--tag", tag, "--reps", "100",
            "--baseline-extra", f"--learning-starts {baseline_learning_starts}"]


def rows(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


# --- learning.py: the grid, its CSVs, the table and the aggregate; runs identified by budget and flags ------------
def test_grid_runs_every_arm_once_skips_finished_runs_and_reads_only_whole_csvs_of_its_budget(tmp_path):
    tag = "qsm[x]"  # glob characters in a tag must not make its runs look new
    out = bench("learning.py", *grid_flags(tmp_path, "qsm", "sac", "sac_utd2", "sac_zoo", "td3", "crossq",
                                           seeds=("1", "1"), tag=tag)).stdout
    for n in (tag, "sac", "sac_utd2", "sac_zoo", "td3", "crossq"):  # one CSV per run: 200-step Pendulum episodes
        assert out.count(f"done {n}_Pendulum-v1_seed1.csv") == 1, out  # --seeds 1 1: run once
        got = rows(tmp_path / "results" / f"{n}_Pendulum-v1_seed1.csv")
        assert [(r["env"], r["seed"], int(r["step"]), r["budget"]) for r in got] == [
            ("Pendulum-v1", "1", 200, "400"), ("Pendulum-v1", "1", 400, "400")]
    assert f"| env | budget | {tag} | sac | sac_utd2 | sac_zoo | td3 | crossq |" in out
    assert "Aggregate over 1 envs × 1 seeds" in out and f"| {tag} | " in out and "| P(arm > sac) |" in out
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    again = bench("learning.py", *grid_flags(tmp_path, "qsm", "sac", tag=tag), "--no-plot").stdout
    assert f"skip {tag}_Pendulum-v1_seed1.csv (done)" in again and "skip sac_Pendulum-v1_seed1.csv (done)" in again

    # another budget: nothing of the 400-step runs is reported as, or continued into, an 800-step run
    other = script("learning.py", *grid_flags(tmp_path, "sac", steps=800), "--plot-only").stdout
    assert "left out: sac_Pendulum-v1_seed1.csv: a run of 400 steps" in other and "| 800" not in other.split("\n")[2]
    p = bench("learning.py", *grid_flags(tmp_path, "sac", steps=800), "--no-plot", rc=1)
    assert "FAILED sac_Pendulum-v1_seed1.csv: it holds a run of 400 steps, not of 800" in p.stdout
    assert p.stderr.strip().endswith("learning.py: 1 of 1 runs failed (listed above)")

    # CSVs that are empty, header-only, cut short or hold a word: one line each, the table still drawn
    res = tmp_path / "results"
    (res / "sac_Pendulum-v1_seed2.csv").write_text("")
    (res / "sac_Pendulum-v1_seed3.csv").write_text("env,seed,step,return,budget\n")
    (res / "sac_Pendulum-v1_seed4.csv").write_text("env,seed,step,return,budget\nPendulum-v1,4,200,-9")
    (res / "sac_Pendulum-v1_seed5.csv").write_text("env,seed,step,return,budget\nPendulum-v1,5,200,oops,400\n")
    table = script("learning.py", *grid_flags(tmp_path, "sac", seeds=("1", "2", "3", "4", "5")), "--plot-only").stdout
    for seed, why in ((2, "holds no episode"), (3, "holds no episode"), (4, "unreadable"), (5, "unreadable")):
        assert f"left out: sac_Pendulum-v1_seed{seed}.csv: {why}" in table, table
    assert "sac_Pendulum-v1_seed4.csv: unreadable (TypeError" in table or "seed4.csv: unreadable (ValueError" in table
    assert "| Pendulum-v1 | 0.4k | " in table and "(n=1)" in table
    shutil.copy(res / "sac_Pendulum-v1_seed1.csv", res / "sac_Pendulum-v1_seed6.csv")  # a whole run of a seed not asked
    only = script("learning.py", *grid_flags(tmp_path, "sac"), "--plot-only", "--labels", "sac=SAC 2").stdout  # seed 1
    assert "left out" not in only and "| Pendulum-v1 | 0.4k | " in only and "(n=1)" in only, only
    assert "| SAC 2 | " in only and "| SAC | " not in only  # the aggregate names the arm by its label

    p = script("learning.py", *grid_flags(tmp_path, "sac"), "--jobs", "0", rc=2)
    assert p.stderr.strip().splitlines()[-1].endswith("--jobs must be ≥ 1 (got 0)")
    p = script("learning.py", *grid_flags(tmp_path, "sac"), "--plot-only", "--labels", "sac", rc=2)
    assert p.stderr.strip().splitlines()[-1].endswith("--labels takes ARM=NAME (got sac)")


def processes(*parts: str) -> list[int]:
    """The pids of the processes whose command line holds every one of parts."""
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that exits between glob and read is gone
            text = Path(cmdline).read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if all(part in text for part in parts):
                pids.append(int(cmdline.split("/")[2]))
    return pids


def test_submitit_local_launcher_runs_the_grid_and_a_preempted_job_continues_its_run(tmp_path):
    """learning.py --launcher submitit-local, end to end: submit, preempt (SIGUSR2, what Slurm sends), requeue,
    resume, CSV and table. The Slurm launcher differs from it only in the executor."""
    budget = 1000
    p = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--launcher", "submitit-local",
                          *grid_flags(tmp_path, "qsm", "sac", steps=budget, baseline_learning_starts=600)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    saved = lambda: (glob.glob(str(tmp_path / "runs" / "qsm_*" / "runs" / "*" / "checkpoint.pt"))  # noqa: E731
                     and glob.glob(str(tmp_path / "runs" / "sac_*" / "state.pkl")))
    wait_for(saved, timeout=180)  # both runs have saved their first checkpoint (step 200)
    time.sleep(1)
    jobs = processes("submitit.core._submit", str(tmp_path))  # submitit's job processes of this test
    assert len(jobs) == 2
    for pid in jobs:
        os.kill(pid, signal.SIGUSR2)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "done qsm_Pendulum-v1_seed1.csv" in out and "done sac_Pendulum-v1_seed1.csv" in out, out
    assert "| env | budget | qsm | sac |" in out
    for n in ("qsm", "sac"):
        log = (tmp_path / "runs" / f"{n}_Pendulum-v1_seed1.log").read_text()
        commands = [l for l in log.splitlines() if l.startswith(sys.executable)]
        assert len(commands) == 2, log[-3000:]  # started, then continued: never started over
        assert ("--resume" in commands[1]) if n == "qsm" else "resuming sac Pendulum-v1 seed 1 at step " in log
        steps = [int(r["step"]) for r in rows(tmp_path / "results" / f"{n}_Pendulum-v1_seed1.csv")]
        assert budget - 200 < steps[-1] <= budget and steps == sorted(steps)  # to the budget (a resume cuts an episode)
    assert len(glob.glob(str(tmp_path / "runs" / "qsm_*" / "runs" / "*"))) == 1


def test_the_slurm_launcher_submits_one_job_array_with_the_asked_resources(tmp_path):
    """The README's Slurm command up to sbatch: stand-ins for Slurm's srun and sbatch (which keeps the script it is
    given and answers as Slurm does) on PATH; the grid's jobs go out as one array with the asked resources (%1: one
    job at a time, --jobs)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/sbatch.sh\necho Submitted batch job 4242\n")
    for f in ("srun", "sbatch"):
        (bin_ / f).chmod(0o755)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "learning.py"), *grid_flags(tmp_path, "qsm", "sac"),
                        "--launcher", "slurm", "--partition", "cpu", "--time-min", "240", "--jobs", "1",
                        "--slurm-extra", "account=myproject", "--no-wait", "--no-plot"],
                       capture_output=True, text=True, timeout=120, env=dict(ENV, PATH=f"{bin_}:{os.environ['PATH']}"))
    assert p.returncode == 0 and "submitted 2 jobs: 4242_0, 4242_1" in p.stdout, p.stdout + p.stderr[-3000:]
    script = (tmp_path / "sbatch.sh").read_text()
    for line in ("--array=0-1%1", "--time=240", "--cpus-per-task=1", "--partition=cpu", "--account=myproject",
                 "--signal=USR2@90"):
        assert f"#SBATCH {line}" in script, script


def test_ctrl_c_stops_the_grid_and_its_runs_save_and_a_run_dies_with_its_runner(tmp_path):
    flags = grid_flags(tmp_path, "sac", steps=50_000)
    start = lambda: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "learning.py"), *flags, "--no-plot"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # noqa: E731
    log = tmp_path / "runs" / "sac_Pendulum-v1_seed1.log"
    p = start()
    wait_for(lambda: glob.glob(str(tmp_path / "runs" / "sac_*" / "state.pkl")), timeout=120)
    p.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and err.strip().endswith(
        "learning.py: stopped; run the same command again to continue from the checkpoints"), err
    assert "Traceback" not in err and "stopped by SIGTERM at step" in log.read_text()
    assert "stopped sac_Pendulum-v1_seed1: run the same command again" in out and "FAILED" not in out, out

    p = start()  # kill -9 of the runner: its run gets SIGTERM (it dies with it) and saves
    wait_for(lambda: "resuming sac Pendulum-v1 seed 1" in log.read_text(), timeout=120)
    p.kill()
    p.wait()
    wait_for(lambda: not processes(str(tmp_path / "runs" / "sac_")), timeout=60)
    assert log.read_text().count("stopped by SIGTERM at step") == 2


# --- baselines.py: one state file, one process per run ------------------------------------------------------------
CRASH = """import os, sys
sys.path.insert(0, {bench!r})
import baselines
real, calls = os.replace, []
def replace(a, b):  # kill -9 just before the second save is committed
    calls.append(b)
    if str(b).endswith("state.pkl") and len(calls) == 2:
        os._exit(9)
    real(a, b)
os.replace = replace
sys.argv = ["baselines.py"] + sys.argv[1:]
baselines.main()
"""


def test_a_baseline_killed_while_saving_resumes_with_every_episode_once(tmp_path):
    flags = ["--algo", "sac", "--env-id", "Pendulum-v1", "--steps", "600", "--out", str(tmp_path / "sac.csv"),
             "--workdir", str(tmp_path / "run"), "--checkpoint-freq", "200", "--learning-starts", "400"]
    crashed = subprocess.run([sys.executable, "-c", CRASH.format(bench=str(ROOT / "benchmarks")), *flags],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert crashed.returncode == 9 and not (tmp_path / "sac.csv").exists()
    lock = open(tmp_path / "run" / "lock")  # a second process on the same run is refused in one line
    fcntl.flock(lock, fcntl.LOCK_EX)
    p = bench("baselines.py", *flags, rc=1)
    assert last_line(p) == f"baselines.py: error: another process is running the run in {tmp_path / 'run'}; wait " \
                           f"for it or stop it"
    lock.close()
    out = bench("baselines.py", *flags).stdout
    assert "resuming sac Pendulum-v1 seed 1 at step 200" in out  # the last whole state: the first save
    assert [int(r["step"]) for r in rows(tmp_path / "sac.csv")] == [200, 400, 600]  # each episode once


# --- the other scripts -------------------------------------------------------------------------------------------
def test_memory_samples_a_run_and_a_failed_run_changes_nothing(tmp_path):
    out = bench("memory.py", "--out", str(tmp_path / "memory.csv"), "--runs", str(tmp_path), "--", "--env-id",
                "Pendulum-v1", "--total-timesteps", "600", *TINY.split()).stdout
    training = [float(r["rss_mb"]) for r in rows(tmp_path / "memory.csv") if int(r["step"]) > 0]
    assert "(exit 0," in out and len(training) >= 2 and all(100 < mb < 5000 for mb in training), out
    before = (tmp_path / "memory.csv").read_text()
    p = bench("memory.py", "--out", str(tmp_path / "memory.csv"), "--runs", str(tmp_path), "--", "--env-id", "Nope-v0",
              rc=1)
    assert last_line(p).startswith("memory.py: qsm.py exited with status 1: qsm.py: error: cannot make environment")
    assert (tmp_path / "memory.csv").read_text() == before


def test_speed_times_the_update(tmp_path):
    out = script("speed.py", "--widths", "32", "--critic-norms", "none", "layer", "--diffusion-steps", "10",
                 "--rounds", "1", "--per-round", "3", "--eager-only").stdout
    for norm, T in (("none", 10), ("layer", 10)):
        row = next(line.split() for line in out.splitlines() if line.strip().startswith(f"32/{norm}/T={T}/inductor "))
        assert 0 < float(row[3]) < 1000, out  # eager ms per update
    assert "Acting: one DDPM sample" in out


def test_step_time_splits_a_learning_step(tmp_path):
    out = bench("step_time.py", "--env-id", "Pendulum-v1", "--steps", "200", "--learning-starts", "100", "--width",
                "32", "--no-compile", cwd=tmp_path).stdout  # its run folder: runs/ under tmp_path, not the checkout
    ms = {line[:34].strip(): float(line.split()[-5]) for line in out.splitlines()[1:-1]}
    assert {"update", "act", "env step", "buffer sample", "check_metrics"} <= ms.keys(), out
    assert ms["update"] > ms["buffer sample"] > 0, out  # a 32-wide update still costs more than sampling a batch


def test_sampler_check_reports_every_sampler_test(tmp_path):
    out = script("sampler_check.py", "--diffusion-steps", "2", "--q-grad-scale", "1", "--steps", "30").stdout
    verdicts = [line.rsplit(": ", 1)[1] for line in out.splitlines()[1:]]
    assert out.startswith("T = 2, M_q = 1.0") and len(verdicts) == 6 and set(verdicts) <= {"PASS", "FAIL"}, out


def test_bandit_draws_the_sampled_actions(tmp_path):
    out = script("bandit.py", "--scales", "1", "--steps", "20", "--samples", "200", "--out", str(tmp_path / "b.csv"),
                "--picture", str(tmp_path / "b.png")).stdout
    got = rows(tmp_path / "b.csv")
    assert len(got) == 4 and (tmp_path / "b.png").stat().st_size > 10_000, out
    assert all(0 <= float(r["at_bounds"]) <= 1 for r in got)


def test_diagnostics_exported_and_final_policies_evaluated_once_each_a_bad_checkpoint_in_one_line(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = str(tmp_path / qsm.main(small_args(seed=3, checkpoint_freq=300))["run_dir"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"PK not a checkpoint")
    p = script("evaluate.py", str(tmp_path / "broken"), run_dir, str(tmp_path / "missing"), "--temperatures", "0", "1",
              "--episodes", "1", "--out", str(tmp_path / "e.csv"), rc=1)
    errors = [l for l in p.stderr.splitlines() if l.startswith("evaluate.py")]
    assert errors[0].startswith(f"evaluate.py: cannot read {tmp_path}/broken/checkpoint.pt: ")
    assert errors[1].startswith(f"evaluate.py: cannot read {tmp_path}/missing/checkpoint.pt: FileNotFoundError")
    got = rows(tmp_path / "e.csv")  # the good run's rows are kept
    assert [float(r["temperature"]) for r in got] == [0, 1] and all(-2000 < float(r["mean"]) <= 0 for r in got)
    script("evaluate.py", run_dir, "--temperatures", "1", "0.5", "0.5", "--episodes", "1", "--out", str(tmp_path / "e.csv"))
    again = rows(tmp_path / "e.csv")  # only the missing temperature, once
    assert again[:2] == got and [float(r["temperature"]) for r in again] == [0, 1, 0.5]
    row = script("spread.py", run_dir, "--states", "20", "--samples", "16").stdout.splitlines()[2].split("|")
    assert 0 < float(row[3]) < 1.2 and 0 <= float(row[4]) <= 1, row  # std per coordinate ≤ 1 on [-1, 1]; a share
    script("diagnostics.py", run_dir, "--windows", "150-300", "--out", str(tmp_path / "d.csv"))
    diag = {r["tag"]: float(r["mean"]) for r in rows(tmp_path / "d.csv")}
    for tag in ("policy/action_at_bounds", "policy/next_action_at_bounds", "policy/beats_random"):
        assert 0 <= diag[tag] <= 1, diag
    assert diag["qsm/dq_da_norm"] > 0 and -1 <= diag["qsm/score_alignment"] <= 1, diag
