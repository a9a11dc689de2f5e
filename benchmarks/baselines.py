"""Baselines from Stable-Baselines3 and sb3-contrib, run on the same envs, budget and metric as qsm.py, resumable.

    python benchmarks/baselines.py --algo sac --env-id Walker2d-v4 --seed 1 --steps 100000 \
        --out benchmarks/results/sac_Walker2d-v4_seed1.csv --workdir benchmarks/.runs/sac_Walker2d-v4_seed1_100000

Arms (hyperparameters in ARMS below; every arm: batch 256, γ 0.99, one update per env step unless said):
- sac: SAC with CleanRL's settings (sac_continuous_action.py): actor LR 3e-4, critic and entropy-coefficient LR 1e-3,
  5,000 random steps, 256×256, τ 0.005, entropy coefficient tuned automatically (target -|A|). One difference:
  CleanRL updates the actor twice every second env step, SB3 once every step: the same number of actor updates.
- sac_utd2: `sac` with two updates per env step (SB3's gradient_steps=2), beside QSM arms that run --utd-ratio 2.
- sac_zoo: SAC with rl-baselines3-zoo's MuJoCo settings: one LR of 3e-4 for all, 10,000 random steps.
- td3: rl-baselines3-zoo's MuJoCo settings: LR 1e-3, 400×300, exploration noise 0.1, 10,000 random steps.
- crossq: sb3-contrib's CrossQ (Bhatt et al., ICLR 2024) at its published settings: LR 1e-3 with Adam β₁ 0.5,
  batch-renormalised critics without target networks, policy delay 3, 5,000 random steps, actor 256×256, critic
  width CROSSQ_WIDTH (the paper's 2048 does not fit a 100k run into an hour on one CPU thread: benchmarks/README.md).
The zoo has no DeepMind Control entries; the same settings are used there.

Envs come from qsm.make_env (DeepMind Control's observations flattened, the same time limits). Metric, as for
qsm.py: the training return of every finished episode at the number of transitions collected when it ended,
written as `env,seed,step,return,budget`. Truncated episodes bootstrap (SB3's handle_timeout_termination).

Resume: every --checkpoint-freq steps, and on SIGINT, SIGTERM or SIGHUP, the model, its replay buffer and the
episodes so far are written as ONE file, `state.pkl` in --workdir, replaced atomically: a kill at any instant leaves
the previous state or the new one, whole, so every episode is in the CSV exactly once. The process then exits with
128 + signal; run it again with the same flags to continue (episodes in flight are cut; random streams are not
restored). One process per --workdir (an OS file lock). The CSV is written, atomically, only when the run reaches
its budget. The replay buffer holds min(1M, --steps) transitions, the same algorithm within the budget.
"""
import argparse
import csv
import fcntl
import io
import os
import pickle
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402  (the one place envs are made)

STOP_SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]
CROSSQ_WIDTH = 256
ARMS = {  # keyword arguments of the SB3 constructor
    "sac": dict(learning_starts=5_000, learning_rate=1e-3),  # actor LR 3e-4: CleanRLSAC below
    "sac_zoo": dict(learning_starts=10_000),
    "td3": dict(learning_starts=10_000, learning_rate=1e-3, policy_kwargs=dict(net_arch=[400, 300])),
    "crossq": dict(learning_starts=5_000, policy_kwargs=dict(net_arch=dict(pi=[256, 256], qf=[CROSSQ_WIDTH] * 2))),
}
ARMS["sac_utd2"] = dict(ARMS["sac"], gradient_steps=2)  # sac, two updates per env step
FORMAT = 1  # version of state.pkl


def fail(msg: str):
    sys.exit(f"baselines.py: error: {msg}")


def algorithm(algo: str):
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.utils import update_learning_rate

    class CleanRLSAC(SAC):
        """SB3's SAC with CleanRL's two learning rates: 3e-4 for the actor, 1e-3 for the critics and α."""

        def _update_learning_rate(self, optimizers):
            for opt in optimizers:
                update_learning_rate(opt, 3e-4 if opt is self.actor.optimizer else 1e-3)

    if algo == "crossq":
        from sb3_contrib import CrossQ

        return CrossQ
    return {"sac": CleanRLSAC, "sac_utd2": CleanRLSAC, "sac_zoo": SAC, "td3": TD3}[algo]


def lock(workdir: Path):
    """One process per run: an OS lock on workdir/lock, released when the process dies (kill -9 included)."""
    f = open(workdir / "lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another process is running the run in {workdir}; wait for it or stop it")
    return f  # keep it open: the lock lives as long as this object


def save_state(path: Path, model, rows: list, budget: int):
    """The model, its replay buffer and the episodes as one file, replaced atomically."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        model.save(Path(tmp) / "model.zip")
        state = {"format": FORMAT, "budget": budget, "steps": model.num_timesteps, "rows": rows,
                 "model": (Path(tmp) / "model.zip").read_bytes(), "replay_buffer": pickle.dumps(model.replay_buffer)}
        with open(Path(tmp) / "state.pkl", "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(Path(tmp) / "state.pkl", path)


def load_state(path: Path, Algo, env, o):
    try:
        state = pickle.loads(path.read_bytes())
        assert isinstance(state, dict) and state.get("format") == FORMAT, "not a state.pkl of this baselines.py"
    except Exception as e:
        fail(f"cannot read {path}: {qsm.first_line(e)}; delete its folder to start the run over")
    if state["budget"] != o.steps:
        fail(f"{path} is a run with a budget of {state['budget']} steps, not {o.steps}; use another --workdir")
    model = Algo.load(io.BytesIO(state["model"]), env=env, device="cpu")
    model.replay_buffer = pickle.loads(state["replay_buffer"])
    model.replay_buffer.device = model.device
    return model, state["rows"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=list(ARMS), required=True)
    p.add_argument("--env-id", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=100_000, help="transitions")
    p.add_argument("--out", type=Path, required=True, help="the CSV written when the run ends")
    p.add_argument("--workdir", type=Path, required=True, help="where the run's state lives")
    p.add_argument("--checkpoint-freq", type=int, default=5_000)
    p.add_argument("--learning-starts", type=int, default=None, help="override (tests only)")
    o = p.parse_args()
    if o.steps < 1 or o.checkpoint_freq < 0:
        fail("--steps must be ≥ 1 and --checkpoint-freq ≥ 0")

    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    try:
        o.workdir.mkdir(parents=True, exist_ok=True)
        o.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot make {o.workdir}: {qsm.first_line(e)}")
    held = lock(o.workdir)  # noqa: F841
    state_path = o.workdir / "state.pkl"
    if (o.workdir / "model.zip").exists() and not state_path.exists():
        fail(f"{o.workdir} holds a run saved by an older baselines.py (three files); delete it to start over")
    env = DummyVecEnv([lambda: Monitor(qsm.make_env(o.env_id))])
    Algo = algorithm(o.algo)
    if state_path.exists():  # continue an interrupted run
        model, rows = load_state(state_path, Algo, env, o)
        print(f"resuming {o.algo} {o.env_id} seed {o.seed} at step {model.num_timesteps}", flush=True)
    else:
        kw = dict(ARMS[o.algo], buffer_size=min(1_000_000, o.steps))
        if o.algo == "td3":
            from stable_baselines3.common.noise import NormalActionNoise

            kw["action_noise"] = NormalActionNoise(np.zeros(env.action_space.shape), 0.1 * np.ones(env.action_space.shape))
        if o.learning_starts is not None:
            kw["learning_starts"] = o.learning_starts
        model, rows = Algo("MlpPolicy", env, seed=o.seed, device="cpu", verbose=0, **kw), []

    stop, start = [], time.time()
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: stop.append(signum))

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    r = float(info["episode"]["r"])
                    if not np.isfinite(r):
                        fail(f"non-finite episode return {r} at step {self.num_timesteps}")
                    rows.append((self.num_timesteps, r))
            if o.checkpoint_freq and self.num_timesteps % o.checkpoint_freq == 0 and self.num_timesteps < o.steps:
                save_state(state_path, model, rows, o.steps)
                recent = [r for _, r in rows[-10:]]
                print(f"step {self.num_timesteps}: return {np.mean(recent) if recent else float('nan'):.1f} (last 10 "
                      f"episodes), {time.time() - start:.0f} s", flush=True)
            return not stop

    try:
        model.learn(o.steps - model.num_timesteps, callback=Record(), reset_num_timesteps=False)
    except Exception as e:  # an env or a network that raises: the last state stays whole
        fail(f"{o.algo} {o.env_id} seed {o.seed} failed at step {model.num_timesteps}: {qsm.first_line(e)}; "
             f"the last saved state is kept in {o.workdir}")
    if stop:
        save_state(state_path, model, rows, o.steps)
        print(f"stopped by {signal.Signals(stop[0]).name} at step {model.num_timesteps}; run again to continue",
              flush=True)
        sys.exit(128 + stop[0])
    tmp = o.out.with_name(o.out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env", "seed", "step", "return", "budget"])
        w.writerows([o.env_id, o.seed, step, f"{r:.3f}", o.steps] for step, r in rows)
    os.replace(tmp, o.out)  # a CSV exists only for a run that reached its budget
    state_path.unlink(missing_ok=True)  # the CSV holds all that is left to keep


if __name__ == "__main__":
    main()
