"""SAC and TD3 from Stable-Baselines3, run on the same envs, budget and metric as qsm.py, resumable like it.

    python benchmarks/baselines.py --algo sac --env-id Walker2d-v4 --seed 1 --steps 100000 \
        --out benchmarks/results/sac_Walker2d-v4_seed1.csv --workdir benchmarks/.runs/sac_Walker2d-v4_seed1

Hyperparameters: rl-baselines3-zoo's MuJoCo settings (hyperparams/sac.yml and td3.yml, "mujoco-defaults"), the
standard published ones for SB3 on these tasks:
- SAC: SB3's defaults (Adam 3e-4, batch 256, buffer 1M, τ 0.005, γ 0.99, 256×256 nets, entropy coefficient
  tuned automatically, one update per step) with 10,000 random steps before learning (learning_starts).
- TD3: Adam 1e-3, batch 256, 400×300 nets, Gaussian exploration noise std 0.1, 10,000 random steps, one update per
  step (SB3's defaults for the rest: target policy noise 0.2 clipped at 0.5, policy delay 2, τ 0.005, γ 0.99).
The zoo has no DeepMind Control entries; the same settings are used there.

Envs come from qsm.make_env, so both algorithms see the same env (DeepMind Control's observations flattened, the
same time limits). Metric, as for qsm.py: the training return of every finished episode, at the number of
transitions collected when it ended (SB3's vector env resets in the same step, so its step count is transitions),
written as `env,seed,step,return`. Truncated episodes bootstrap (SB3's handle_timeout_termination).

Resume: every --checkpoint-freq steps, and on SIGINT, SIGTERM or SIGHUP (as qsm.py), the model, its replay buffer
and the episodes so far are saved to --workdir, and the process exits with status 128 + signal; run it again with
the same flags and it continues from there (episodes in flight are cut, as for qsm.py on MuJoCo, and the random
streams are not restored). The CSV is written, atomically, only when the run ends. The replay buffer holds
min(1M, --steps) transitions: the zoo's 1M is never filled within a shorter budget, so the algorithm is the same.
"""
import argparse
import csv
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402  (the one place envs are made)

STOP_SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]


def hyperparameters(algo: str, act_dim: int) -> dict:
    from stable_baselines3.common.noise import NormalActionNoise

    if algo == "sac":
        return dict(learning_starts=10_000)
    return dict(learning_starts=10_000, learning_rate=1e-3, batch_size=256, policy_kwargs=dict(net_arch=[400, 300]),
                action_noise=NormalActionNoise(np.zeros(act_dim), 0.1 * np.ones(act_dim)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=["sac", "td3"], required=True)
    p.add_argument("--env-id", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=100_000, help="transitions")
    p.add_argument("--out", type=Path, required=True, help="the CSV written when the run ends")
    p.add_argument("--workdir", type=Path, required=True, help="where the run's checkpoint lives")
    p.add_argument("--checkpoint-freq", type=int, default=5_000)
    p.add_argument("--learning-starts", type=int, default=None, help="override (tests only; default: the zoo's)")
    o = p.parse_args()

    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    o.workdir.mkdir(parents=True, exist_ok=True)
    model_path, buffer_path, rows_path = o.workdir / "model.zip", o.workdir / "replay_buffer.pkl", o.workdir / "rows.pkl"
    env = DummyVecEnv([lambda: Monitor(qsm.make_env(o.env_id))])
    Algo = {"sac": SAC, "td3": TD3}[o.algo]
    if model_path.exists():  # continue an interrupted run
        model = Algo.load(model_path, env=env, device="cpu")
        model.load_replay_buffer(buffer_path)
        rows = pickle.loads(rows_path.read_bytes())
        print(f"resuming {o.algo} {o.env_id} seed {o.seed} at step {model.num_timesteps}", flush=True)
    else:
        kw = hyperparameters(o.algo, env.action_space.shape[0])
        kw["buffer_size"] = min(1_000_000, o.steps)  # the zoo's 1M, never filled within the budget: same algorithm
        if o.learning_starts is not None:
            kw["learning_starts"] = o.learning_starts
        model, rows = Algo("MlpPolicy", env, seed=o.seed, device="cpu", verbose=0, **kw), []

    stop, start = [], time.time()
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: stop.append(signum))

    def save():  # each file written whole, then renamed over the last one
        for path, write in ((model_path, model.save), (buffer_path, model.save_replay_buffer)):
            tmp = path.with_name("tmp_" + path.name)
            write(tmp)
            os.replace(tmp, path)
        rows_path.with_name("tmp_rows.pkl").write_bytes(pickle.dumps(rows))
        os.replace(rows_path.with_name("tmp_rows.pkl"), rows_path)

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    rows.append((self.num_timesteps, float(info["episode"]["r"])))
            if o.checkpoint_freq and self.num_timesteps % o.checkpoint_freq == 0:
                save()
                recent = [r for _, r in rows[-10:]]
                print(f"step {self.num_timesteps}: return {np.mean(recent) if recent else float('nan'):.1f} (last 10 "
                      f"episodes), {time.time() - start:.0f} s", flush=True)
            return not stop

    model.learn(o.steps - model.num_timesteps, callback=Record(), reset_num_timesteps=False)
    if stop:
        save()
        print(f"stopped by {signal.Signals(stop[0]).name} at step {model.num_timesteps}; run again to continue",
              flush=True)
        sys.exit(128 + stop[0])
    tmp = o.out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env", "seed", "step", "return"])
        w.writerows([o.env_id, o.seed, step, f"{r:.3f}"] for step, r in rows)
    tmp.rename(o.out)  # a CSV exists only for a finished run


if __name__ == "__main__":
    main()
