"""The paper's multimodality claim at realistic critic scales: a bandit (one state, 1-D action) whose Q has two equal
maxima at a = ±0.6, Q(a) = -k·min((a - 0.6)², (a + 0.6)²). QSM trains a denoiser against this fixed Q with qsm.py's
own loss and sampler; we draw 4000 actions and histogram them.

k = 0.3 gives ‖∇ₐQ‖ ≈ 0.2 at the noised buffer actions (DeepMind Control's critics: 0.06-0.8), k = 5 gives ≈ 3
(Gym MuJoCo's: 2.4-6). Configurations: qsm.py's defaults, our former defaults (T = 5, M_q = 1.5), and the paper's
unnormalized target at T = 5 with M_q = 50 (official, DeepMind Control) and M_q = 5 (our former Gym MuJoCo default).

    python benchmarks/bandit.py            # writes benchmarks/results/bandit.csv and benchmarks/bandit.png
"""
import argparse
import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402

CONFIGS = {  # name: qsm.Args flags
    "default (normalized, T = 10, M_q = 3)": {},
    "former default (T = 5, M_q = 1.5)": dict(diffusion_steps=5, q_grad_scale=1.5),
    "paper, M_q = 50": dict(diffusion_steps=5, normalize_q_grad=False, q_grad_scale=50.0),
    "paper, M_q = 5": dict(diffusion_steps=5, normalize_q_grad=False, q_grad_scale=5.0),
}
MODES = (-0.6, 0.6)


class BanditQ(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, s, a):  # (2, B), like qsm.TwinQ
        q = -self.k * torch.minimum((a - MODES[0]) ** 2, (a - MODES[1]) ** 2).sum(-1)
        return torch.stack([q, q])


def sample_policy(flags: dict, k: float, steps: int, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    args = qsm.Args(**flags)
    sched = qsm.Schedule(args.diffusion_steps, torch.device("cpu"))
    den = qsm.Denoiser(1, 1, args.actor_hidden_dims, args.time_dim)
    opt = torch.optim.Adam(den.parameters(), lr=args.actor_lr)
    qf = BanditQ(k)
    for _ in range(steps):  # buffer actions: uniform in [-1, 1], as after the random steps
        batch = {"obs": torch.zeros(args.batch_size, 1), "actions": torch.rand(args.batch_size, 1) * 2 - 1}
        loss, _ = qsm.qsm_loss(den, qf, sched, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qsm.ddpm_sample(den, sched, torch.zeros(n, 1), 1, args.ddpm_temperature, args.clip_sampler)[:, 0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.3, 5.0], help="k, the critic's scale")
    p.add_argument("--steps", type=int, default=3000, help="QSM updates")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bandit.csv"))
    p.add_argument("--picture", default=str(ROOT / "benchmarks" / "bandit.png"))
    o = p.parse_args()
    torch.set_num_threads(1)
    rows, samples = [], {}
    for name, flags in CONFIGS.items():
        for k in o.scales:
            a = sample_policy(flags, k, o.steps, o.samples)
            samples[name, k] = a
            near = lambda x: ((a - x).abs() < 0.2).float().mean().item()
            rows.append(dict(config=name, k=k, near_minus=near(MODES[0]), near_plus=near(MODES[1]), near_zero=near(0.0),
                             at_bounds=(a.abs() >= 1).float().mean().item()))
            print(" ".join(f"{key}={v:.3f}" if isinstance(v, float) else f"{key}={v}" for key, v in rows[-1].items()))
    Path(o.out).parent.mkdir(parents=True, exist_ok=True)
    with open(o.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(o.scales), len(CONFIGS), figsize=(4 * len(CONFIGS), 2.6 * len(o.scales)),
                             sharex=True, squeeze=False)
    for j, name in enumerate(CONFIGS):
        for i, k in enumerate(o.scales):
            ax = axes[i][j]
            ax.hist(samples[name, k].numpy(), bins=40, range=(-1, 1), density=True, color="tab:blue")
            for m in MODES:
                ax.axvline(m, color="tab:red", ls="--", lw=1)
            ax.set_title(f"{name}\nk = {k}", fontsize=9)
            ax.set_yticks([])
    for ax in axes[-1]:
        ax.set_xlabel("sampled action (optima at ±0.6, dashed)")
    fig.tight_layout()
    fig.savefig(o.picture, dpi=110)
    print(f"wrote {o.out} and {o.picture}")


if __name__ == "__main__":
    main()
