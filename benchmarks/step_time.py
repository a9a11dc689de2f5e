"""Where a learning step's wall time goes in qsm.py's loop: each part (update, acting, env step, buffer, checks) is
wrapped with a timer during one short run, and its time per learning step printed.

    python benchmarks/step_time.py --env-id Walker2d-v4 --steps 3000 --learning-starts 1000 > benchmarks/results/step_time.txt
"""
import argparse
import collections
import sys
import time
from pathlib import Path

import gymnasium as gym
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qsm  # noqa: E402

SECONDS, CALLS, BUSY = collections.defaultdict(float), collections.Counter(), []


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        if BUSY:  # called inside another timed part (the samples of an eager update): counted there
            return fn(*args, **kwargs)
        BUSY.append(name)
        t = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            BUSY.pop()
        key = f"{name} (first call: compile)" if CALLS[name] == 0 and name in ("update", "act") else name
        SECONDS[key] += time.perf_counter() - t
        CALLS[name] += 1
        return out
    return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="Walker2d-v4")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--critic-norm", default="none", choices=["none", "layer"])
    p.add_argument("--width", type=int, default=256, help="hidden width of both networks")
    p.add_argument("--diffusion-steps", type=int, default=5, help="T")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager (a quick check that it runs)")
    o = p.parse_args()
    make_update, compile_ = qsm.make_update, torch.compile
    qsm.make_update = lambda *a, **k: timed("update", make_update(*a, **k))
    act = qsm.ddpm_sample  # the acting policy: compiled by train with --compile; eager, the loop's calls are timed
    torch.compile = lambda fn, *a, **k: timed("act", compile_(fn, *a, **k)) if fn is act else compile_(fn, *a, **k)
    if not o.compile:
        qsm.ddpm_sample = timed("act", act)
    for cls, name in ((qsm.ReplayBuffer, "sample"), (qsm.ReplayBuffer, "add")):
        setattr(cls, name, timed(f"buffer {name}", getattr(cls, name)))
    for name in ("check_finite", "check_metrics", "policy_diagnostics"):
        setattr(qsm, name, timed(name, getattr(qsm, name)))
    gym.wrappers.vector.RecordEpisodeStatistics.step = timed("env step", gym.wrappers.vector.RecordEpisodeStatistics.step)
    torch.set_num_threads(1)
    qsm.main(qsm.Args(env_id=o.env_id, total_timesteps=o.steps, learning_starts=o.learning_starts, eval_freq=0,
                      cuda=False, checkpoint_freq=0, critic_norm=o.critic_norm, compile=o.compile,
                      diffusion_steps=o.diffusion_steps,
                      actor_hidden_dims=(o.width, o.width), critic_hidden_dims=(o.width, o.width)))
    learning = o.steps - o.learning_starts
    print(f"# {o.env_id}, {learning} learning steps, {'compiled' if o.compile else 'eager'}, one thread, width "
          f"{o.width}, critic norm {o.critic_norm}, T = {o.diffusion_steps}")
    for k, v in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        print(f"{k:34s} {v:8.2f} s {1e3 * v / learning:8.2f} ms per learning step")
    print(f"{'all parts':34s} {sum(SECONDS.values()):8.2f} s")


if __name__ == "__main__":
    main()
