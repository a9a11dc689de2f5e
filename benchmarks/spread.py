"""How spread the policy of a run's checkpoint is: at states drawn from its replay buffer, N samples of π(·|s) each
(the acting sampler, without best-of-N selection), and per state the std of each action coordinate, the share of
coordinates at ±1, and what the best of 10 samples gains over the mean sample under the critics' mean Q. A uniform
random policy on [-1, 1] has a std of 0.577 per coordinate; a greedy one, 0.

    python benchmarks/spread.py benchmarks/.runs/cand_best10_Walker2d-v4_seed1_*/runs/* > benchmarks/results/spread.txt
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qsm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding a checkpoint.pt")
    p.add_argument("--states", type=int, default=200)
    p.add_argument("--samples", type=int, default=64)
    o = p.parse_args()
    torch.set_num_threads(1)
    print("| run | step | std per coordinate | at ±1 | Q: best of 10 − mean sample | Q: std over samples |")
    print("|---|---|---|---|---|---|")
    for run in o.runs:
        torch.manual_seed(0)
        c = qsm.load_checkpoint(f"{run}/checkpoint.pt", training=True)
        a = qsm.Args(**{k: v for k, v in c["args"].items() if k in qsm.Args.__dataclass_fields__})
        (obs_dim, act_dim), n = c["dims"], o.samples
        norm = qsm.ObsNorm(obs_dim) if c["args"].get("obs_norm") else None  # runs before commit 847ce2c have none
        den = qsm.Denoiser(obs_dim, act_dim, a.actor_hidden_dims, a.time_dim, norm)
        qf = qsm.TwinQ(obs_dim, act_dim, a.critic_hidden_dims, norm=a.critic_norm, obs_norm=norm).eval()
        qsm.restore(dict(denoiser=den, qf=qf), {**c, "denoiser": c.get("policy", c["denoiser"])}, run)
        sched = qsm.Schedule(a.diffusion_steps, torch.device("cpu"))
        s = c["rb"]["obs"][torch.randint(0, c["rb"]["size"], (o.states,))].repeat_interleave(n, 0)
        with torch.no_grad():
            x = qsm.ddpm_sample(den, sched, s, act_dim, a.ddpm_temperature, a.clip_sampler)
            q = qf(s, x).mean(0).view(o.states, n)
        x = x.view(o.states, n, act_dim)
        gain = q[:, :10].max(1).values - q.mean(1)
        print(f"| {Path(run).name} | {c['global_step']} | {x.std(1).mean():.3f} | {(x.abs() >= 1).float().mean():.2f} | "
              f"{gain.mean():.2f} | {q.std(1).mean():.2f} |")


if __name__ == "__main__":
    main()
