# Q-Score Matching (QSM): a diffusion-model policy learned from rewards by matching its score to ∇ₐQ.
# Psenka, Escontrela, Abbeel, Ma, "Learning a Diffusion Model Policy from Rewards via Q-Score Matching", ICML 2024,
# arXiv 2312.11752. Official JAX code: github.com/Alescontrela/score_matching_rl. Run: python qsm.py --env-id Walker2d-v4
# Part one (to the banner "the long-run machinery") is the algorithm; part two keeps long runs safe.
import contextlib
import copy
import fcntl
import functools
import importlib.util
import itertools
import math
import os
import pickle
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tqdm
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (first part of the run's name)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    env_id: str = "Walker2d-v4"
    """Gymnasium env id (bounded Box actions, flat Box or Dict observations), e.g. `dm_control/walker-walk-v0`"""
    total_timesteps: int = 1_000_000
    """total environment steps, i.e. transitions, summed over all --num-envs copies"""
    num_envs: int = 1
    """number of environment copies stepped together (gym.vector.SyncVectorEnv)"""
    buffer_size: int = 1_000_000
    """replay buffer capacity, in transitions"""
    learning_starts: int = 10_000
    """env steps of uniform random actions before the first update ("start_training" in the official code)"""
    batch_size: int = 256
    """transitions per gradient update"""
    utd_ratio: int = 2
    """gradient updates per environment step (update-to-data ratio; official: 1)"""
    gamma: float = 0.99
    """discount factor γ"""
    tau: float = 0.005
    """Polyak rate τ of the target critics"""
    critic_lr: float = 1e-3
    """Adam learning rate of the twin critics (official: 3e-4; 1e-3 is CleanRL SAC's)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the denoiser ε_θ (initial value of its cosine decay)"""
    actor_lr_decay_steps: int = 2_000_000
    """updates over which the actor LR decays to 0 by a cosine ("decay_steps" in the official code; 0 = constant)"""
    actor_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden widths of the denoiser MLP (mish; official: 512 512)"""
    critic_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden widths of each critic MLP (relu; official: 512 512)"""
    critic_norm: Literal["none", "layer"] = "layer"
    """"layer": LayerNorm (no affine parameters) after every hidden layer of the critics (Ba et al. 2016); official: none"""
    time_dim: int = 64
    """size of the learnable Fourier features of the diffusion step t ("time_dim" in the official code)"""
    diffusion_steps: int = 10
    """number of DDPM steps, T in the paper and the official code (official: 5)"""
    q_grad_scale: float = 3.0
    """M_q: ε_θ is regressed onto -M_q·∇ₐQ/ρ ("M_q" in the official code, α in Alg. 1 of the paper)"""
    pessimism: float = 1.0
    """β: y uses mean(Q̄) − β·|Q̄₁ − Q̄₂|/2 (BRO's form): 1 = the min of clipped double Q (official), 0 = the mean"""
    obs_norm: bool = True
    """normalise s by its running mean and std at the input of the denoiser and critics (SimBa's RSNorm; official: off)"""
    normalize_q_grad: bool = True
    """ρ = RMS of ∇ₐQ over batch and action coordinates (M_q dimensionless); off: ρ = 1, the paper's (M_q = 50)"""
    ddpm_temperature: float = 1.0
    """scale of the noise injected at each reverse step ("ddpm_temperature" in the official code)"""
    clip_sampler: bool = True
    """clip the action to [-1, 1] after every reverse step ("clip_sampler" in the official code)"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to sampled actions when acting (as the official code)"""
    target_noise: float = 0.1
    """std of the Gaussian noise added to the sampled next action a' in the critic target"""
    eval_freq: int = 10_000
    """evaluate the policy every this many env steps (0 = never)"""
    eval_episodes: int = 5
    """episodes per evaluation (DDPM sampling, no exploration noise)"""
    log_freq: int = 250
    """log losses and QSM diagnostics every this many env steps"""
    # bookkeeping and long runs
    cuda: bool = True
    """use CUDA when a GPU is present (else the CPU)"""
    compile: bool = True
    """torch.compile the losses and the sampler (inductor; a warm-up at start, needs a C++ compiler on CPU)"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "qsm"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    checkpoint_freq: int = 100_000
    """save all a resumed run needs to `runs/{run}/checkpoint.pt` every this many steps (0: never), on a signal and
    at the end"""
    resume: Optional[str] = None
    """continue the run saved in this checkpoint.pt, in its folder, with its flags (other flags are ignored)"""
    eval_only: Optional[str] = None
    """evaluate the policy saved in this checkpoint.pt (architecture flags included) for --eval-episodes episodes"""


# --- Noise schedule: β_t, α_t = 1 - β_t, ᾱ_t = Π_{s≤t} α_s (DDPM, Ho et al. 2020); index t = 0..T-1 --------------
class Schedule:
    """The official code's "vp" schedule: the variance-preserving SDE (Song et al. 2021) discretised in T steps."""

    def __init__(self, T: int, device: torch.device):
        t, b_min, b_max = torch.arange(1, T + 1, dtype=torch.float64), 0.1, 10.0
        betas = 1 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)  # t = 1..T
        self.T, self.betas = T, betas.float().to(device)  # β_t
        self.alphas = 1 - self.betas  # α_t
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # ᾱ_t
        self.eps_coef = (self.betas / (1 - self.alpha_bars).sqrt()).tolist()  # β_t / √(1-ᾱ_t); floats: no tiny ops
        self.mean_coef = (1 / self.alphas.sqrt()).tolist()  # 1 / √α_t
        self.sigmas = self.betas.sqrt().tolist()  # σ_t = √β_t


# --- Networks: the denoiser ε_θ(s, aₜ, t) and the twin critics Q_φ1, Q_φ2 (one ensemble network) ----------------
def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, act: type[nn.Module]) -> nn.Sequential:
    dims = (in_dim, *hidden_dims)
    layers = [m for i, o in zip(dims[:-1], dims[1:]) for m in (nn.Linear(i, o), act())]
    return nn.Sequential(*layers, nn.Linear(dims[-1], out_dim))


class FourierFeatures(nn.Module):
    """Learnable Fourier features of the diffusion step: [cos 2πtW, sin 2πtW], W ~ N(0, 0.2²)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(0.2 * torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t.float()[:, None] * self.w
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ObsNorm(nn.Module):
    """s ↦ (s - μ)/√(σ² + 1e-8), μ and σ² over every observation seen so far (Lee et al. 2025, SimBa's RSNorm).
    One instance is shared by the denoiser and the critics, so each checkpointed network carries the statistics."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("var", torch.ones(obs_dim))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def update(self, obs: np.ndarray):  # merge a batch of observations into the running moments (Chan et al. 1979)
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.mean.device)
        n, total, delta = x.shape[0], self.count + x.shape[0], x.mean(0) - self.mean
        self.var.copy_((self.var * self.count + x.var(0, correction=0) * n + delta**2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return (s - self.mean) / (self.var + 1e-8).sqrt()


class Denoiser(nn.Module):
    """ε_θ(s, aₜ, t): the noise in aₜ, from [aₜ, s, time embedding] as in the official code (Mish: part two)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], time_dim: int,
                 obs_norm: Optional[ObsNorm] = None):
        super().__init__()
        self.obs_norm = obs_norm or nn.Identity()
        self.time_embed = nn.Sequential(FourierFeatures(time_dim), mlp(time_dim, (128,), 128, Mish))
        self.net = mlp(act_dim + obs_dim + 128, hidden_dims, act_dim, Mish)

    def forward(self, s: torch.Tensor, a_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) steps, or (1,) when the whole batch shares one step (then it is embedded once)."""
        return self.net(torch.cat([a_t, self.obs_norm(s), self.time_embed(t).expand(a_t.shape[0], -1)], dim=-1))


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, B, in) -> (E, B, out)."""

    def __init__(self, num: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    """Q_φ1(s, a), Q_φ2(s, a) as one network with an ensemble dimension; forward returns (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num: int = 2, norm: str = "none",
                 obs_norm: Optional[ObsNorm] = None):
        super().__init__()
        self.obs_norm = obs_norm or nn.Identity()
        dims = (obs_dim + act_dim, *hidden_dims)
        self.hidden = nn.ModuleList(EnsembleLinear(num, i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.out = EnsembleLinear(num, dims[-1], 1)
        self.num, self.layer_norm = num, norm == "layer"

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.obs_norm(s), a], dim=-1).expand(self.num, -1, -1)
        for layer in self.hidden:
            x = layer(x)
            x = F.relu(F.layer_norm(x, x.shape[-1:]) if self.layer_norm else x)
        return self.out(x).squeeze(-1)


# --- Replay buffer: preallocated float32 arrays; actions stored in the policy's [-1, 1] space -----------------------
class ReplayBuffer:
    FIELDS = ("obs", "next_obs", "actions", "rewards", "terminated")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        shapes = dict(obs=(obs_dim,), next_obs=(obs_dim,), actions=(act_dim,), rewards=(), terminated=())
        for k, array in allocate(capacity, shapes).items():  # part two: fails at once if it cannot fit in memory
            setattr(self, k, array)
        self.capacity, self.size, self.pos, self.device = capacity, 0, 0, device

    def add(self, obs, next_obs, actions, rewards, terminated):
        """Store one transition per env; float64 observations become float32."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.next_obs[idx], self.actions[idx] = obs, next_obs, actions
        self.rewards[idx], self.terminated[idx] = rewards, terminated
        self.pos, self.size = (self.pos + len(obs)) % self.capacity, min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, batch_size)
        return {k: torch.from_numpy(getattr(self, k)[idx]).to(self.device) for k in self.FIELDS}

    def state_dict(self) -> dict:  # the filled rows only, as tensors (loads with torch.load(weights_only=True))
        return {"pos": self.pos, "size": self.size, **{k: torch.from_numpy(getattr(self, k)[: self.size]) for k in self.FIELDS}}

    def load_state_dict(self, state: dict):
        for k in self.FIELDS:
            getattr(self, k)[: state["size"]] = state[k].numpy()
        self.pos, self.size = state["pos"], state["size"]


# --- DDPM sampler (Ho et al. 2020, Alg. 2): a_T ~ N(0, I); a_{t-1} = (a_t - β_t/√(1-ᾱ_t)·ε_θ)/√α_t + σ_t z --------
@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, sched: Schedule, s: torch.Tensor, act_dim: int, temperature: float = 1.0,
                clip: bool = True) -> torch.Tensor:
    a = torch.randn(s.shape[0], act_dim, device=s.device)  # a_T
    for t in reversed(range(sched.T)):
        eps = denoiser(s, a, torch.full((1,), t, device=s.device))  # ε_θ(s, a_t, t)
        a = sched.mean_coef[t] * (a - sched.eps_coef[t] * eps)  # μ_θ(a_t, t) = (a_t - β_t/√(1-ᾱ_t)·ε_θ)/√α_t
        if t > 0:
            a = a + temperature * sched.sigmas[t] * torch.randn_like(a)  # + σ_t z
        if clip:
            a = a.clamp(-1, 1)
    return a.clamp(-1, 1)


# --- Losses. Critic: clipped double-Q TD target. Actor: Q-score matching, ‖ε_θ(s, aₜ, t) + M_q·∇ₐQ(s, aₜ)/ρ‖² ------
def critic_loss(qf, qf_target, denoiser, sched, batch, args: Args):
    with torch.no_grad():
        next_a = ddpm_sample(denoiser, sched, batch["next_obs"], batch["actions"].shape[1], args.ddpm_temperature,
                             args.clip_sampler)  # a' ~ π(·|s')
        at_bounds = (next_a.abs() >= 1).float().mean()  # a saturated sampler puts most coordinates at ±1
        next_a = (next_a + args.target_noise * torch.randn_like(next_a)).clamp(-1, 1)
    q, next_q = qf(batch["obs"], batch["actions"]), qf_target(batch["next_obs"], next_a)  # Q, Q̄: (2, B)
    with torch.no_grad():  # y = r + γ(1 - terminated)·min_i Q̄_i(s', a') at β = 1: only `terminated` cuts the bootstrap
        next_v = torch.lerp(next_q.mean(0), next_q.min(0).values, args.pessimism)  # mean − β·|Q̄₁−Q̄₂|/2, exact at 0, 1
        y = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * next_v
    per_q = ((q - y) ** 2).mean(1)
    return per_q.sum(), {"losses/qf1_loss": per_q[0].detach(), "losses/qf2_loss": per_q[1].detach(),
                         "losses/qf1_values": q[0].mean().detach(), "policy/next_action_at_bounds": at_bounds}


def qsm_loss(denoiser, qf, sched, batch, args: Args):
    s, a0 = batch["obs"], batch["actions"]  # a₀ ~ 𝒟
    t = torch.randint(0, sched.T, (a0.shape[0],), device=a0.device)  # t ~ U{0..T-1}
    alpha_bar = sched.alpha_bars[t][:, None]
    a_t = alpha_bar.sqrt() * a0 + (1 - alpha_bar).sqrt() * torch.randn_like(a0)  # forward process q(aₜ|a₀)
    with torch.no_grad():  # ∇ₐQ(s, aₜ) of the mean of both critics: a fixed target, no gradient reaches the critics
        dq_da = torch.func.grad(lambda a: qf(s, a).mean(0).sum())(a_t)
        rho = dq_da.pow(2).mean().sqrt() + 1e-8 if args.normalize_q_grad else 1.0  # ρ = RMS(∇ₐQ), Q's scale (paper: 1)
    eps = denoiser(s, a_t, t)  # ε_θ(s, aₜ, t)
    loss = ((eps + args.q_grad_scale * dq_da / rho) ** 2).sum(-1).mean()  # ‖ε_θ + M_q ∇ₐQ/ρ‖²
    with torch.no_grad():  # diagnostics: the score -ε_θ should point along ∇ₐQ
        diag = {"losses/actor_loss": loss.detach(), "qsm/score_alignment": F.cosine_similarity(-eps, dq_da, -1).mean(),
                "qsm/dq_da_norm": dq_da.norm(dim=-1).mean(), "qsm/eps_norm": eps.norm(dim=-1).mean()}
    return loss, diag


# --- One update: a critic TD step, a QSM actor step, Polyak steps -------------------------------------------------
@torch.no_grad()
def polyak_update(net: nn.Module, target: nn.Module, tau: float):
    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), tau)  # φ̄ ← (1-τ)φ̄ + τφ


def make_update(denoiser, qf, qf_target, q_opt, actor_opt, sched, args: Args):
    """update(batch) -> metrics (tensors: no host sync). --compile: both losses run as inductor graphs."""
    critic_step, actor_step = (torch.compile(critic_loss), torch.compile(qsm_loss)) if args.compile else (critic_loss, qsm_loss)

    def update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q_loss, q_info = critic_step(qf, qf_target, denoiser, sched, batch, args)
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        actor_loss, a_info = actor_step(denoiser, qf, sched, batch, args)
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        polyak_update(qf, qf_target, args.tau)
        return {**q_info, **a_info}

    return update


# --- Training: main(args) (part two) runs train under a signal handler ------------------------------------------
def train(args: Args, stop: "Stop") -> dict:
    setup = prepare(args)  # part two: the flags (from the checkpoint with --resume), env and checkpoints, all checked
    args, obs_dim, act_dim = setup.args, setup.obs_dim, setup.act_dim
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    sched = Schedule(args.diffusion_steps, device)
    obs_norm = ObsNorm(obs_dim).to(device) if args.obs_norm else None
    denoiser = Denoiser(obs_dim, act_dim, args.actor_hidden_dims, args.time_dim, obs_norm).to(device)  # ε_θ
    critic = functools.partial(TwinQ, obs_dim, act_dim, args.critic_hidden_dims, norm=args.critic_norm, obs_norm=obs_norm)
    qf, qf_target = critic().to(device), critic().to(device)  # Q_φ1, Q_φ2 and the targets Q̄
    qf_target.load_state_dict(qf.state_dict())
    if args.eval_only:  # the policy of a saved run
        restore(dict(denoiser=denoiser), setup.saved_policy, args.eval_only)
        returns = evaluate(denoiser, sched, args, device, stop)
        print(f"eval {args.env_id}: return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes")
        return {"eval_returns": returns}

    q_opt = torch.optim.Adam(qf.parameters(), lr=args.critic_lr, fused=True)  # fused: one kernel
    actor_opt = torch.optim.Adam(denoiser.parameters(), lr=args.actor_lr, fused=True)
    K = args.actor_lr_decay_steps  # cosine decay lr·½(1 + cos(π·min(k, K)/K)), as optax.cosine_decay_schedule
    actor_sched = torch.optim.lr_scheduler.LambdaLR(
        actor_opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, K) / K)) if K > 0 else 1.0)
    update = make_update(denoiser, qf, qf_target, q_opt, actor_opt, sched, args)
    sample = torch.compile(ddpm_sample) if args.compile else ddpm_sample
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim, device)
    rng = RNG(args.seed, device)
    # same-step autoreset: every step is a transition; an ended episode's last obs is in infos["final_obs"]
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.vector.SyncVectorEnv(
        [functools.partial(make_env, args.env_id) for _ in range(args.num_envs)],  # a partial pickles into checkpoints
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP))
    objects = dict(denoiser=denoiser, qf=qf, qf_target=qf_target, q_opt=q_opt, actor_opt=actor_opt,
                   actor_sched=actor_sched, rb=rb, rng=rng)  # what a checkpoint holds
    run = Run(setup, stop, envs, objects, update, sample, sched, device)  # part two: fresh, or resumed
    step, num_updates, returns, envs, obs = run.step, run.num_updates, run.returns, run.envs, run.obs
    writer, metrics, act_space = run.writer, {}, envs.single_action_space
    every = lambda freq: freq > 0 and step // freq != (step - args.num_envs) // freq  # noqa: E731 (crossed a multiple)

    try:  # the RL loop: act, step, store, update, log, evaluate, checkpoint
        while step < args.total_timesteps and not stop:
            if step < args.learning_starts:  # uniform random actions, then the DDPM policy (+ optional noise)
                actions = rng.np.uniform(-1, 1, (args.num_envs, act_dim)).astype(np.float32)
            else:
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)
                a = sample(denoiser, sched, s, act_dim, args.ddpm_temperature, args.clip_sampler)
                actions = (a + args.exploration_noise * torch.randn_like(a)).clamp(-1, 1).cpu().numpy()
            check_finite("the policy", step + 1, run.last_good, action=actions)
            next_obs, rewards, terminations, truncations, infos = envs.step(to_env_action(actions, act_space))
            real_next_obs = next_obs.copy()  # s' of an episode that ended is its final obs, not the next reset
            for i in np.flatnonzero(infos.get("_final_obs", [])):
                real_next_obs[i] = infos["final_obs"][i]
            check_finite(args.env_id, step + 1, run.last_good, reward=rewards, observation=real_next_obs,
                         reset_observation=next_obs)
            rb.add(obs, real_next_obs, actions, rewards, terminations)  # truncated is not terminated: it bootstraps
            if args.obs_norm:  # the running moments of s (SimBa)
                obs_norm.update(obs)
            obs, step = next_obs, step + args.num_envs
            run.pbar.update(args.num_envs)
            for i in np.flatnonzero(infos.get("_episode", [])):
                returns.append(float(infos["episode"]["r"][i]))
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], step)

            if step > args.learning_starts:  # UTD updates per env step
                for _ in range(args.utd_ratio * args.num_envs):
                    batch = rb.sample(args.batch_size, rng.np)
                    metrics = update(batch)
                    actor_sched.step()
                    num_updates += 1
                    check_metrics(metrics, step, num_updates, run.last_good)  # NaN guard: one host sync
                states = batch["obs"]  # where the diagnostics look at the sampler

            if every(args.log_freq) or step >= args.total_timesteps:  # and the last step: a run's end is logged
                if metrics:
                    metrics |= {"charts/actor_lr": actor_opt.param_groups[0]["lr"],
                                **policy_diagnostics(denoiser, qf, sched, states, act_dim, args)}
                run.log(step, metrics, returns)
            if every(args.eval_freq):
                ep_returns = evaluate(denoiser, sched, args, device, stop)
                if ep_returns is not None:  # None: cut by a stop signal
                    writer.add_scalar("eval/episodic_return", np.mean(ep_returns), step)
            if every(args.checkpoint_freq) or step >= args.total_timesteps:
                run.save("every --checkpoint-freq and at the end", step, num_updates, returns, obs, envs)
        if stop:
            run.save_and_exit(stop, step, num_updates, returns, obs, envs)
    except Exception as e:  # an env that raises, a full disk, …: one line naming the last good checkpoint
        run.fail(e, step)
    finally:
        run.close(envs)
    return dict(objects, run_dir=run.dir, num_updates=num_updates, global_step=step, episodic_returns=list(returns))


# =================================================================================================================
# Part two: the long-run machinery. A reader who came for the algorithm can stop here. What follows makes long runs
# safe: flag and env checks that fail at start in one line, signals, NaN guards, checkpoints and resume, run folders.
# =================================================================================================================
def main(args: Args) -> dict:
    with Stop() as stop:
        return train(args, stop)


Setup = NamedTuple("Setup", [("args", Args), ("obs_dim", int), ("act_dim", int), ("resume", Optional[dict]),
                             ("saved_policy", Optional[dict])])


def prepare(args: Args) -> Setup:
    """The flags (from the checkpoint with --resume), the env's sizes, the checkpoint to resume (--resume) or to
    evaluate (--eval-only), all checked before anything runs."""
    resume = load_checkpoint(args.resume, training=True) if args.resume else None
    if resume:  # a resumed run continues with the flags it was started with
        if ignored := [k for k, v in vars(args).items() if k != "resume" and v != getattr(Args, k)]:
            print(f"qsm.py: --resume takes every flag from the checkpoint; ignoring {', '.join(ignored)}", file=sys.stderr)
        if unknown := resume["args"].keys() - vars(args).keys():  # a flag that an earlier qsm.py had
            fail(f"{args.resume} does not fit this qsm.py: it has flags unknown here: {', '.join(sorted(unknown))}")
        args = Args(**{**resume["args"], "resume": args.resume})
    check_args(args)
    obs_dim, act_dim = check_env(args)
    saved = load_checkpoint(args.eval_only) if args.eval_only else None
    for c, path in ((resume, args.resume), (saved, args.eval_only)):
        made_for = c and (c["args"]["env_id"], *c["dims"])
        if c and made_for != (args.env_id, obs_dim, act_dim):
            fail(f"{path} was made for {made_for[0]} (obs {made_for[1]}, act {made_for[2]}), not {args.env_id} (obs "
                 f"{obs_dim}, act {act_dim}); pass --env-id {made_for[0]}")
    if saved:  # the architecture comes from the checkpoint
        for k in ("actor_hidden_dims", "critic_hidden_dims", "critic_norm", "obs_norm", "time_dim", "diffusion_steps"):
            setattr(args, k, saved["args"].get(k, getattr(Args, k)))
    return Setup(args, obs_dim, act_dim, resume, saved)


# --- Input checks and environments: everything that can fail, fails before training, in one line -----------------
def fail(msg: str):
    sys.exit(f"qsm.py: error: {msg}")  # one line on stderr, exit status 1


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['(no message)'])[0]}"


def check_args(a: Args):
    for ok, msg in [
        (0 <= a.seed < 2**31, f"--seed must be in [0, 2^31) (got {a.seed})"),
        (min(a.num_envs, a.batch_size, a.utd_ratio, a.diffusion_steps) >= 1,
         "--num-envs, --batch-size, --utd-ratio and --diffusion-steps must be ≥ 1"),
        (a.batch_size <= a.buffer_size, f"--batch-size {a.batch_size} is larger than --buffer-size {a.buffer_size}"),
        (a.total_timesteps % a.num_envs == 0,
         f"--total-timesteps {a.total_timesteps} is not a multiple of --num-envs {a.num_envs}"),
        (a.diffusion_steps <= 1000 and a.num_envs <= 4096, "--diffusion-steps must be ≤ 1000 (DDPM's T) and "
         "--num-envs ≤ 4096: each costs memory and time per action"),
        (network_bytes(a) < total_memory() / 4, f"networks of widths {a.actor_hidden_dims}, {a.critic_hidden_dims} "
         f"and --time-dim {a.time_dim} need {network_bytes(a) / 2**30:.1f} GiB with their optimizer states, more than "
         f"a quarter of this machine's memory"),
        (a.eval_only or 0 <= a.learning_starts < a.total_timesteps, f"--learning-starts {a.learning_starts} must be "
         f"in [0, --total-timesteps {a.total_timesteps}): no update would run"),
        (0 < a.tau <= 1 and 0 <= a.gamma <= 1, "need 0 < --tau ≤ 1 and 0 ≤ --gamma ≤ 1"),
        (a.critic_lr > 0 and a.actor_lr > 0, f"learning rates must be > 0 (got {a.critic_lr}, {a.actor_lr})"),
        (a.actor_lr_decay_steps >= 0, f"--actor-lr-decay-steps must be ≥ 0 (got {a.actor_lr_decay_steps})"),
        (len(a.actor_hidden_dims) > 0 and len(a.critic_hidden_dims) > 0 and min(a.actor_hidden_dims + a.critic_hidden_dims) >= 1,
         "--actor-hidden-dims and --critic-hidden-dims need at least one width, each ≥ 1"),
        (a.time_dim >= 2 and a.time_dim % 2 == 0, f"--time-dim must be even and ≥ 2 (got {a.time_dim})"),
        (a.q_grad_scale > 0, f"--q-grad-scale must be > 0 (got {a.q_grad_scale})"),
        (min(a.ddpm_temperature, a.exploration_noise, a.target_noise) >= 0,
         "--ddpm-temperature, --exploration-noise and --target-noise must be ≥ 0"),
        (min(a.eval_freq, a.checkpoint_freq) >= 0 and a.log_freq >= 1,
         "--eval-freq and --checkpoint-freq must be ≥ 0 (0 = never), --log-freq ≥ 1"),
        (a.eval_episodes >= 1 or (a.eval_freq == 0 and not a.eval_only),
         "--eval-episodes must be ≥ 1 when evaluating (or --eval-freq 0)"),
        (not a.track or importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
    ]:
        if not ok:
            fail(msg)


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def network_bytes(a: Args, n: int = 1024) -> int:
    """A bound on the bytes of parameters, gradients, Adam moments and targets (×5), for observations and actions
    of up to n numbers each (the env is not made yet)."""
    widths = lambda first, hidden: list(zip((first, *hidden), (*hidden, n)))  # noqa: E731
    return 20 * (sum(i * o for i, o in widths(n + 128, a.actor_hidden_dims) + 2 * widths(n, a.critic_hidden_dims))
                 + 128 * a.time_dim)


TIME_LIMIT = 1000  # steps per episode for envs registered without one (MuJoCo's and DeepMind Control's length)


def make_env(env_id: str) -> gym.Env:
    """The one place envs are made (training, evaluation, checks). DeepMind Control's dict observations are
    flattened. Every episode ends: an env registered without a time limit gets TIME_LIMIT steps (a truncation, so
    the critic target still bootstraps)."""
    try:
        if env_id.startswith("dm_control/"):  # DeepMind Control through shimmy, whose import registers its envs and
            os.environ.setdefault("MUJOCO_GL", "off")  # imports dm_control, which picks its renderer then: none
            import shimmy

            gym.register_envs(shimmy)
        env = gym.make(env_id)
    except Exception as e:
        fail(f"cannot make environment {env_id!r}: {first_line(e)}")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    return env if env.spec.max_episode_steps else gym.wrappers.TimeLimit(env, TIME_LIMIT)


def check_env(args: Args) -> tuple[int, int]:
    """Make, reset and step the env, so that what would fail later fails now. Returns (obs size, action size)."""
    env = make_env(args.env_id)
    obs_space, act = env.observation_space, env.action_space
    if not isinstance(act, gym.spaces.Box) or len(act.shape) != 1:
        fail(f"{args.env_id} has the action space {act}; QSM needs a continuous 1-D Box action space")
    if not (np.isfinite(act.low).all() and np.isfinite(act.high).all()):
        fail(f"{args.env_id} has an unbounded action space {act}; QSM needs finite bounds to rescale [-1, 1]")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{args.env_id} has observations {obs_space}; QSM here needs a flat (1-D) Box observation space")
    try:
        env.reset(seed=args.seed)
        reward = env.step(to_env_action(np.zeros(act.shape), act))[1]
        if np.ndim(reward) != 0:
            raise ValueError(f"step() returned a reward of shape {np.shape(reward)}; a scalar is needed")
    except Exception as e:
        fail(f"{args.env_id}: reset/step failed: {first_line(e)}")
    env.close()
    return obs_space.shape[0], act.shape[0]


def to_env_action(a: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    """Map the policy's a ∈ [-1, 1] linearly onto the env's Box [low, high]."""
    return space.low + (a + 1) * 0.5 * (space.high - space.low)


def allocate(capacity: int, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The replay buffer's float32 arrays, written now (np.full): a buffer too big for memory fails here, not later."""
    need = 4 * capacity * sum(math.prod(s) for s in shapes.values())  # bytes
    with contextlib.suppress(MemoryError):
        if need <= total_memory():
            return {k: np.full((capacity, *s), 0, np.float32) for k, s in shapes.items()}
    fail(f"a replay buffer of {capacity:,} transitions needs {need / 2**30:.1f} GiB, more than this machine has; "
         f"lower --buffer-size")


# --- NaN guards ------------------------------------------------------------------------------------------------
def check_finite(source: str, step, last_good: str, **fields: np.ndarray):
    """Stop before a NaN or Inf reaches the env or the buffer, checked in the buffer's float32 (1e39 is Inf there)."""
    for name, x in fields.items():
        with np.errstate(over="ignore"):
            if not np.isfinite(np.asarray(x, dtype=np.float32)).all():
                fail(f"non-finite {name.replace('_', ' ')} from {source} at step {step}; it was not stored; last "
                     f"good checkpoint: {last_good}")


def check_metrics(metrics: dict[str, torch.Tensor], step: int, num_updates: int, last_good: str):
    if not torch.isfinite(torch.stack(list(metrics.values()))).all():  # one host sync per update
        bad = ", ".join(f"{k} = {float(v)}" for k, v in metrics.items() if not math.isfinite(float(v)))
        fail(f"non-finite {bad} at step {step} (update {num_updates}); last good checkpoint: {last_good} (resume "
             f"with --resume PATH)")


# --- Diagnostics and a faster mish -----------------------------------------------------------------------------------
@torch.no_grad()
def policy_diagnostics(policy, qf, sched, s: torch.Tensor, act_dim: int, args: Args) -> dict[str, torch.Tensor]:
    """What the acting sampler does at buffer states: the share of action coordinates it puts at ±1, and how often
    its action beats a uniform random one under Q (≈ 1 for a policy that follows Q; ≤ 0.5 for a degenerate one)."""
    a = ddpm_sample(policy, sched, s, act_dim, args.ddpm_temperature, args.clip_sampler)
    q_policy, q_random = qf(s, a).mean(0), qf(s, torch.rand_like(a) * 2 - 1).mean(0)
    return {"policy/action_at_bounds": (a.abs() >= 1).float().mean(),
            "policy/beats_random": (q_policy > q_random).float().mean()}


class Mish(nn.Module):
    """mish(x) = x·tanh(softplus(x)) = x·n/(n+2) with n = eˣ(eˣ+2): torch's nn.Mish (a test compares them) written
    with one exp instead of exp, log1p and tanh, which compiles to faster CPU code. For x > 20, n/(n+2) = 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x.clamp(max=20))
        n = e * (e + 2)
        return x * n / (n + 2)


# --- Signals and evaluation ----------------------------------------------------------------------------------------
class Stop:
    """Ctrl-C (SIGINT), SIGTERM (sent by schedulers, SIGKILL follows) and SIGHUP (a closed terminal). Until training
    begins they exit at once (nothing to save); then the loop stops at the next step boundary, and evaluation at
    the next env step, the run saves a checkpoint and exits; a second signal kills at once. bool(stop): stop now."""

    SIGNALS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]

    def __init__(self):
        self.signum, self.training = None, False

    def __bool__(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        self.saved = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGHUP", None):  # the terminal is gone: writing to it would raise, so write nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        if not self.training:
            print(f"\nqsm.py: {name} before training began: exiting, nothing to save", file=sys.stderr)
            sys.exit(128 + signum)
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        print(f"\nqsm.py: {name}: saving a checkpoint at the end of this step, then exiting; a second signal "
              f"(Ctrl-C) exits at once without saving (the last checkpoint stays whole)", file=sys.stderr)


def evaluate(policy, sched, args: Args, device, stop: Stop):
    """--eval-episodes returns without exploration noise (None if stopped)."""
    env = make_env(args.env_id)
    returns = []
    while len(returns) < args.eval_episodes and not stop:
        obs, _ = env.reset(seed=args.seed + 10_000 + len(returns))
        done, ep_return = False, 0.0
        while not (done or stop):
            s = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            a = ddpm_sample(policy, sched, s, env.action_space.shape[0], args.ddpm_temperature, args.clip_sampler)
            obs, r, terminated, truncated, _ = env.step(to_env_action(a[0].cpu().numpy(), env.action_space))
            check_finite(f"{args.env_id} in evaluation episode {len(returns) + 1}", "its end", "unchanged", reward=r,
                         observation=obs)
            ep_return += float(r)
            done = terminated or truncated
        returns.append(ep_return)
    env.close()
    return None if stop else returns


# --- Checkpoints: everything a run needs to continue, written atomically; all but the envs load with weights_only --
class RNG:
    """The run's random streams: numpy's (random actions, batches), torch's, and CUDA's in a run on a GPU."""

    def __init__(self, seed: int, device: torch.device):
        self.np, self.cuda = np.random.default_rng(seed), device.type == "cuda"

    def state_dict(self) -> dict:
        return {"np": self.np.bit_generator.state, "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.cuda else []}  # reading them would start CUDA

    def load_state_dict(self, state: dict):
        self.np.bit_generator.state = state["np"]
        torch.set_rng_state(state["torch"])
        torch.cuda.set_rng_state_all(state["cuda"] if self.cuda else [])


def env_state(envs: gym.vector.VectorEnv) -> Optional[bytes]:
    """The vector env pickled, where pickling keeps the episodes in flight. Gymnasium's MuJoCo envs are EzPickle:
    they pickle only their constructor arguments, so for them this is None and a resumed run starts new episodes."""
    with contextlib.suppress(pickle.PicklingError, TypeError, AttributeError):
        if not any(isinstance(e.unwrapped, gym.utils.EzPickle) for e in envs.unwrapped.envs):
            return pickle.dumps(envs)


def load_checkpoint(path: str, training: bool = False) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path!r}: {first_line(e)}")
    if not isinstance(ckpt, dict) or not {"args", "dims", "denoiser", "qf"} <= ckpt.keys():
        fail(f"{path} is not a checkpoint of this qsm.py (a file of another program, or of an older version)")
    missing = {"rb", "global_step", "num_updates", "recent_returns", "obs", "envs", "run_name"} - ckpt.keys()
    if training and missing:
        fail(f"{path} does not fit this qsm.py: it has no {', '.join(sorted(missing))}")
    return ckpt


def save_checkpoint(path: str, state: dict):
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a crash while saving leaves the previous checkpoint whole
    except (OSError, RuntimeError) as e:  # a full disk, a removed folder: leave no partial file behind
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        fail(f"cannot write {path}: {first_line(e)}; the previous checkpoint, if any, is unchanged")


def make_run_dir(run_name: str) -> str:
    """runs/{run_name}, made here and by no other run: a run started in the same second gets a suffix _2, _3…"""
    try:
        os.makedirs("runs", exist_ok=True)
        for i in itertools.count(1):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path := f"runs/{run_name}" + (f"_{i}" if i > 1 else ""))  # atomic: one run gets a name
                return path
    except OSError as e:
        fail(f"cannot make a run folder in {os.getcwd()}/runs: {first_line(e)}")


def lock_run_dir(run_dir: str):
    """One process per run: an OS lock on {run_dir}/lock, released when the file closes or the process dies."""
    try:
        f = open(f"{run_dir}/lock", "w")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        fail(f"another process is running the run in {run_dir}; wait for it to end or stop it first")
    except OSError as e:
        fail(f"cannot write to the run folder {run_dir}: {first_line(e)}")


def restore(objects: dict, state: dict, path: str):
    """load_state_dict for each object; a checkpoint of another qsm.py version fails in one line saying what differs."""
    for k, obj in objects.items():
        if k not in state:
            fail(f"{path} does not fit this qsm.py: it has no {k!r}")
        try:
            obj.load_state_dict(state[k])
        except Exception as e:  # torch names the missing, unexpected and mis-shaped parameters
            fail(f"{path} does not fit this qsm.py: {k}: {type(e).__name__}: {' '.join(str(e).split())}")


class Run:
    """One run: its folder (locked: one process per run), TensorBoard writer and progress bar, and what a checkpoint
    holds: the stateful objects (their state_dicts) and the loop's counters. Made fresh, or from the checkpoint to
    resume; saves after a finiteness check, exits on a signal, turns any error into one line."""

    def __init__(self, setup: Setup, stop: Stop, envs, objects: dict, update, sample, sched, device):
        args, resume, (obs_dim, act_dim) = setup.args, setup.resume, (setup.obs_dim, setup.act_dim)
        self.args, self.dims, self.objects = args, (obs_dim, act_dim), objects
        self.step, self.num_updates, self.returns, self.envs = 0, 0, deque(maxlen=10), envs
        if resume:
            restore(objects, resume, args.resume)
            self.step, self.num_updates = resume["global_step"], resume["num_updates"]
            self.returns.extend(resume["recent_returns"])
        if resume and resume["envs"] is not None:  # the episodes in flight continue exactly
            envs.close()  # (pickle runs code: resume only your own files)
            self.envs, self.obs = pickle.loads(resume["envs"]), resume["obs"].numpy()
        else:  # a fresh run, or envs that cannot be saved (MuJoCo): new episodes, seeded by the step
            self.obs, _ = envs.reset(seed=args.seed + self.step)
        self.last_good = args.resume or "none yet"
        check_finite(args.env_id, self.step, self.last_good, reset_observation=self.obs)
        if args.compile:  # compile now rather than at the first update, then put every state back
            saved = copy.deepcopy({k: obj.state_dict() for k, obj in objects.items() if k != "rb"})
            print("qsm.py: compiling the update and the sampler (--no-compile skips this)", file=sys.stderr)
            rb = objects["rb"]
            update({k: torch.zeros(args.batch_size, *getattr(rb, k).shape[1:], device=device) for k in rb.FIELDS})
            sample(objects["denoiser"], sched, torch.zeros(args.num_envs, obs_dim, device=device), act_dim,
                   args.ddpm_temperature, args.clip_sampler)
            for k, state in saved.items():
                objects[k].load_state_dict(state)

        self.dir = (os.path.dirname(args.resume) or ".") if resume else make_run_dir(  # a resume stays in its folder
            f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
        self.name, self.path = resume["run_name"] if resume else os.path.basename(self.dir), f"{self.dir}/checkpoint.pt"
        self.lock = lock_run_dir(self.dir)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=self.name, save_code=True)
        # on resume, purge_step drops what the interrupted run logged after its checkpoint: the curve has no overlap
        self.writer = SummaryWriter(self.dir, purge_step=self.step + 1 if resume else None)
        if not resume:
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in vars(args).items()))
        self.pbar = tqdm.tqdm(total=args.total_timesteps, initial=self.step, unit="step", dynamic_ncols=True)
        self.start_step, self.start_time, stop.training = self.step, time.time(), True

    def log(self, step: int, metrics: dict, returns: deque):
        sps = int((step - self.start_step) / (time.time() - self.start_time))
        self.writer.add_scalar("charts/SPS", sps, step)
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)
        self.pbar.set_postfix(ret=f"{np.mean(returns):.1f}" if returns else "n/a", sps=sps, refresh=False)

    def save(self, reason: str, step: int, num_updates: int, returns: deque, obs: np.ndarray, envs):
        for name in ("denoiser", "qf"):
            if not all(torch.isfinite(p).all() for p in self.objects[name].parameters()):
                fail(f"non-finite parameters in {name} at step {step}; last good checkpoint: {self.last_good}")
        save_checkpoint(self.path, {
            "args": vars(self.args), "dims": self.dims, "run_name": self.name,
            **{k: obj.state_dict() for k, obj in self.objects.items()}, "global_step": step,
            "num_updates": num_updates, "recent_returns": list(returns), "obs": torch.from_numpy(obs),
            "envs": env_state(envs)})
        self.last_good = self.path
        self.writer.add_text("checkpoints", f"{reason}: {self.path}", step)
        if step >= self.args.total_timesteps:
            self.pbar.write(f"qsm.py: saved {self.path}; evaluate its policy with: python qsm.py --env-id "
                            f"{self.args.env_id} --eval-only {self.path}", file=sys.stderr)

    def save_and_exit(self, stop: Stop, *counters):
        sig = signal.Signals(stop.signum).name
        self.save(sig, *counters)
        print(f"\nqsm.py: stopped by {sig} at step {counters[0]}; checkpoint saved, continue with: "
              f"python qsm.py --resume {self.path}", file=sys.stderr)
        sys.exit(128 + stop.signum)  # the shell's code for "killed by this signal": the run did not finish

    def fail(self, e: Exception, step: int):
        if os.environ.get("QSM_DEBUG"):
            raise e
        fail(f"{first_line(e)} at step {step}; last good checkpoint: {self.last_good} (QSM_DEBUG=1 shows the "
             f"traceback)")

    def close(self, envs):
        self.pbar.close()
        envs.close()
        with contextlib.suppress(Exception):  # a full disk has been reported already
            self.writer.close()  # flushes the event file
        self.lock.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
