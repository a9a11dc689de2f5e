"""How greedy a QSM actor becomes under a real, frozen critic: load a run's checkpoint (its twin critics and replay
buffer), train a fresh denoiser against that critic for --updates QSM steps with the given sampler and target, then
sample the policy at buffer states and report its spread and how much of the attainable Q it reaches:

    greedy = (Q(s, a~π) − Q(s, a~U)) / (Q(s, a*) − Q(s, a~U)),   a* = gradient ascent on Q from the best of 64 uniform

(1: the policy acts at Q's maximum; 0: no better than uniform random actions). The critic never changes, so this
isolates the actor: which target and sampler let the policy follow a critic that Gym MuJoCo actually produces.
--sigma-power p scales the target by σₜᵖ, σₜ = √(1−ᾱₜ) (0: the paper's target; 1: the Boltzmann score at every
noise level, so a reverse step is a Langevin step of length βₜ·M_q/ρ).

    python benchmarks/actor_probe.py <run folder> --configs "5 1.5 0" "10 3 0" "5 5 1" ...   (T M_q p per config)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import qsm  # noqa: E402


def train_actor(qf, rb, obs_dim, act_dim, T, mq, p, updates, seed, hidden, flags=()):
    torch.manual_seed(seed)
    sched = qsm.Schedule(T, torch.device("cpu"))
    den = qsm.Denoiser(obs_dim, act_dim, hidden, 64, qf.obs_norm if isinstance(qf.obs_norm, qsm.ObsNorm) else None)
    opt = torch.optim.Adam(den.parameters(), lr=3e-4)
    sig = (1 - sched.alpha_bars).sqrt() ** p
    g = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        idx = torch.randint(0, rb["size"], (256,), generator=g)
        s, a0 = rb["obs"][idx], rb["actions"][idx]
        if "policy" in flags:  # a₀ ~ π(·|s): fit the denoiser where the sampler goes
            a0 = qsm.ddpm_sample(den, sched, s, act_dim)
        t = torch.randint(0, T, (256,))
        ab = sched.alpha_bars[t][:, None]
        a_t = ab.sqrt() * a0 + (1 - ab).sqrt() * torch.randn_like(a0)
        if "clip" in flags:  # aₜ in [-1, 1], where the clipped sampler evaluates ε_θ and the critic has data
            a_t = a_t.clamp(-1, 1)
        with torch.no_grad():
            dq = torch.func.grad(lambda a: qf(s, a).mean(0).sum())(a_t)
            rho = dq.pow(2).mean().sqrt() + 1e-8
        loss = ((den(s, a_t, t) + mq * sig[t][:, None] * dq / rho) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return den, sched


def train_ddpg_actor(qf, rb, obs_dim, act_dim, updates, seed, hidden):
    """Reference: a deterministic tanh actor trained by ascending Q through the action (DDPG, TD3's actor)."""
    torch.manual_seed(seed)
    pi = torch.nn.Sequential(qsm.mlp(obs_dim, hidden, act_dim, torch.nn.ReLU), torch.nn.Tanh())
    opt = torch.optim.Adam(pi.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        s = rb["obs"][torch.randint(0, rb["size"], (256,), generator=g)]
        loss = -qf(s, pi(s)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pi


def q_max(qf, s, act_dim, n=64, steps=50):
    a = (torch.rand(s.shape[0], n, act_dim) * 2 - 1)
    with torch.no_grad():
        q = qf(s.repeat_interleave(n, 0), a.view(-1, act_dim)).mean(0).view(-1, n)
    a = a[torch.arange(s.shape[0]), q.argmax(1)].clone().requires_grad_(True)
    opt = torch.optim.Adam([a], lr=0.05)
    for _ in range(steps):
        loss = -qf(s, a).mean(0).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            a.clamp_(-1, 1)
    with torch.no_grad():
        return qf(s, a).mean(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder holding a checkpoint.pt")
    p.add_argument("--configs", nargs="+", default=["5 1.5 0"],
                   help='"T M_q p [clip] [policy]" per config: clip aₜ to [-1, 1]; a₀ from the policy, not the buffer')
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--states", type=int, default=256)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", type=int, nargs="+", default=[0],
                   help="extra noise-free reverse steps at t = 0 after the sampler (a Langevin-style polish), per row")
    o = p.parse_args()
    torch.set_num_threads(1)
    c = qsm.load_checkpoint(f"{o.run}/checkpoint.pt", training=True)
    a = qsm.Args(**{k: v for k, v in c["args"].items() if k in qsm.Args.__dataclass_fields__})
    obs_dim, act_dim = c["dims"]
    norm = qsm.ObsNorm(obs_dim) if c["args"].get("obs_norm") else None  # runs before commit 847ce2c have none
    qf = qsm.TwinQ(obs_dim, act_dim, a.critic_hidden_dims, norm=a.critic_norm, obs_norm=norm).eval()
    qsm.restore(dict(qf=qf), c, o.run)
    for prm in qf.parameters():
        prm.requires_grad_(False)
    rb = c["rb"]
    torch.manual_seed(o.seed + 1)
    s = rb["obs"][torch.randint(0, rb["size"], (o.states,))]
    q_star = q_max(qf, s, act_dim)
    with torch.no_grad():
        q_unif = qf(s.repeat_interleave(o.samples, 0), torch.rand(o.states * o.samples, act_dim) * 2 - 1).mean(0)
        q_unif = q_unif.view(o.states, o.samples).mean(1)
        q_buf = qf(s, rb["actions"][torch.randint(0, rb["size"], (o.states,))]).mean(0)
    print(f"# {Path(o.run).name} step {c['global_step']}: Q uniform {q_unif.mean():.2f}, a* {q_star.mean():.2f}; "
          f"{o.updates} updates per config")
    print("| T | M_q | p | polish steps | std per coordinate | at ±1 | greedy | greedy, best of 10 |")
    print("|---|---|---|---|---|---|---|---|")
    pi = train_ddpg_actor(qf, rb, obs_dim, act_dim, o.updates, o.seed, a.actor_hidden_dims)
    with torch.no_grad():
        q_det = qf(s, pi(s)).mean(0)
    print(f"# reference: a deterministic actor trained by ascending Q (DDPG): greedy "
          f"{((q_det - q_unif) / (q_star - q_unif).clamp(min=1e-6)).mean():.2f}")
    for cfg in o.configs:
        T, mq, pw, *flags = cfg.split()
        den, sched = train_actor(qf, rb, obs_dim, act_dim, int(T), float(mq), float(pw), o.updates, o.seed,
                                 a.actor_hidden_dims, flags)
        pw = " ".join([pw, *flags])
        for k in o.refine:
            with torch.no_grad():
                ss = s.repeat_interleave(o.samples, 0)
                x = qsm.ddpm_sample(den, sched, ss, act_dim)
                t0 = torch.zeros(1, dtype=torch.long)
                for _ in range(k):  # a_0 ← (a_0 - β₀/√(1-ᾱ₀)·ε_θ(s, a_0, 0))/√α₀, clipped
                    x = (sched.mean_coef[0] * (x - sched.eps_coef[0] * den(ss, x, t0))).clamp(-1, 1)
                q = qf(ss, x).mean(0).view(o.states, o.samples)
            x = x.view(o.states, o.samples, act_dim)
            gap = (q_star - q_unif).clamp(min=1e-6)
            greedy = ((q.mean(1) - q_unif) / gap).mean()
            best10 = ((q[:, :10].max(1).values - q_unif) / gap).mean()
            print(f"| {T} | {mq} | {pw} | {k} | {x.std(1).mean():.3f} | {(x.abs() >= 1).float().mean():.2f} | "
                  f"{greedy:.2f} | {best10:.2f} |", flush=True)

if __name__ == "__main__":
    main()
