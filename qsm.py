# Q-Score Matching (QSM): a diffusion-model policy learned from rewards by matching its score to ∇ₐQ.
# Psenka, Escontrela, Abbeel, Ma, "Learning a Diffusion Model Policy from Rewards via Q-Score Matching", ICML 2024,
# arXiv 2312.11752. Official JAX code: github.com/Alescontrela/score_matching_rl. Run: python qsm.py --env-id Walker2d-v4
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
from typing import Literal, Optional

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
    """name of this experiment (first part of run_name)"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (GPU); on CPU two runs of one seed are identical (tested)"""
    cuda: bool = True
    """use CUDA when a GPU is present (falls back to CPU with a message)"""
    compile: bool = True
    """torch.compile the losses and the sampler (inductor; ~20 s warm-up, needs a C++ compiler on CPU);
    --no-compile runs the plain eager code"""
    track: bool = False
    """log to Weights & Biases as well as TensorBoard"""
    wandb_project_name: str = "qsm"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    save_model: bool = False
    """save a checkpoint to `runs/{run_name}/qsm.pt` at the end of training"""
    checkpoint: Optional[str] = None
    """path of a checkpoint to load (networks and their architecture flags)"""
    eval_only: bool = False
    """with --checkpoint: evaluate the loaded policy for --eval-episodes episodes and exit"""
    checkpoint_freq: int = 100_000
    """every this many env steps, and on Ctrl-C/SIGTERM/SIGHUP, save all a resumed run needs (networks, optimizers,
    replay buffer, RNG states, step) to `runs/{run_name}/checkpoint.pt` (0 = only on a signal)"""
    resume: Optional[str] = None
    """continue the run saved in this checkpoint.pt: its flags (other flags are ignored), step and TensorBoard curve"""
    capture_video: bool = False
    """record the first episode of every evaluation to `videos/{run_name}/` (with moviepy; headless MuJoCo uses
    MUJOCO_GL=egl, see README)"""

    env_id: str = "Walker2d-v4"
    """the Gymnasium environment id (Box action space, flat Box or Dict observations), DeepMind Control's as
    `dm_control/walker-walk-v0`; an env registered without a time limit gets one of 1000 steps"""
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
    utd_ratio: int = 1
    """gradient updates per environment step (update-to-data ratio)"""
    gamma: float = 0.99
    """discount factor γ"""
    tau: float = 0.005
    """Polyak rate τ of the target critics"""
    actor_tau: float = 1.0
    """Polyak rate of a target denoiser that acts and samples a' in the critic target ("actor_tau" in the official
    code, which uses 0.001); 1 = no target denoiser, ε_θ itself acts (our default, the one benchmarked: README)"""
    critic_lr: float = 1e-3
    """Adam learning rate of the twin critics (official: 3e-4; 1e-3, CleanRL SAC's, learned Hopper faster: README)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the denoiser ε_θ (initial value of its cosine decay)"""
    actor_lr_decay_steps: int = 2_000_000
    """updates over which the actor LR decays to 0 by a cosine ("decay_steps" in the official code; 0 = constant)"""
    actor_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden widths of the denoiser MLP (mish; official: 512 512, 2.6× the compute for no gain by 50k: README)"""
    critic_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden widths of each critic MLP (relu; official: 512 512)"""
    critic_norm: Literal["none", "batch"] = "none"
    """"batch": CrossQ's critic (Bhatt et al., ICLR 2024): batch renormalisation before every layer, (s, a) and
    (s', a') through the critic in one pass so that both share its statistics, and no target critics (--tau unused)"""
    time_dim: int = 64
    """size of the learnable Fourier features of the diffusion step t ("time_dim" in the official code)"""
    diffusion_steps: int = 5
    """number of DDPM steps, T in the paper and the official code"""
    beta_schedule: Literal["vp", "cosine", "linear"] = "vp"
    """noise schedule β₁..β_T ("beta_schedule" in the official code)"""
    q_grad_scale: float = 1.5
    """M_q: the denoiser is regressed onto -M_q·∇ₐQ/RMS(∇ₐQ) ("M_q" in the official code, α in Alg. 1 of the paper);
    dimensionless, the same for rewards of any scale (README: derivation, sampler tests)"""
    normalize_q_grad: bool = True
    """divide ∇ₐQ by its root mean square over the batch and action coordinates (our default); --no-normalize-q-grad
    regresses onto -M_q·∇ₐQ as the paper does, whose M_q then depends on the reward scale (official: 50 on DMC)"""
    ddpm_temperature: float = 1.0
    """scale of the noise injected at each reverse step ("ddpm_temperature" in the official code)"""
    clip_sampler: bool = True
    """clip the action to [-1, 1] after every reverse step ("clip_sampler" in the official code)"""
    exploration_noise: float = 0.0
    """std of the Gaussian noise added to sampled actions when acting (official: 0.1; the DDPM sample explores by
    itself, and without the noise the probes learned as well or better: README, exploration study)"""
    target_noise: float = 0.1
    """std of the Gaussian noise added to the sampled next action a' in the critic target"""
    eval_freq: int = 10_000
    """evaluate the policy every this many env steps (0 = never)"""
    eval_episodes: int = 5
    """episodes per evaluation (DDPM sampling, no exploration noise)"""
    log_freq: int = 250
    """log losses and QSM diagnostics every this many env steps"""


# ---------------------------------------------------------------------------------------------------------------
# Noise schedule: β_t, α_t = 1 - β_t, ᾱ_t = Π_{s≤t} α_s (DDPM, Ho et al. 2020). Index t = 0..T-1.
# ---------------------------------------------------------------------------------------------------------------
def make_beta_schedule(name: str, T: int) -> torch.Tensor:
    if name == "vp":  # variance-preserving SDE discretised (Song et al. 2021), b_min = 0.1, b_max = 10
        t = torch.arange(1, T + 1, dtype=torch.float64)
        b_min, b_max = 0.1, 10.0
        betas = 1 - torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * t - 1) / T**2)
    elif name == "cosine":  # Nichol & Dhariwal 2021, s = 0.008
        s = 0.008
        t = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    elif name == "linear":  # Ho et al. 2020
        betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {name!r}")
    return betas.float()


class Schedule:
    def __init__(self, name: str, T: int, device: torch.device):
        self.T = T
        self.betas = make_beta_schedule(name, T).to(device)  # β_t
        self.alphas = 1 - self.betas  # α_t
        self.alpha_bars = torch.cumprod(self.alphas, 0)  # ᾱ_t
        # the reverse step's constants as Python floats, so that sampling adds no tiny tensor ops
        self.eps_coef = (self.betas / (1 - self.alpha_bars).sqrt()).tolist()  # β_t / √(1-ᾱ_t)
        self.mean_coef = (1 / self.alphas.sqrt()).tolist()  # 1 / √α_t
        self.sigmas = self.betas.sqrt().tolist()  # σ_t = √β_t


# ---------------------------------------------------------------------------------------------------------------
# Networks: the denoiser ε_θ(s, aₜ, t) and the twin critics Q_φ1, Q_φ2 (one ensemble network).
# ---------------------------------------------------------------------------------------------------------------
class Mish(nn.Module):
    """mish(x) = x·tanh(softplus(x)) = x·n/(n+2) with n = eˣ(eˣ+2): the same function with one exp instead of
    exp, log1p and tanh, 3–5× faster when compiled for CPU. For x > 20, n/(n+2) = 1 in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(x.clamp(max=20))
        n = e * (e + 2)
        return x * n / (n + 2)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, act: type[nn.Module]) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), act()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


class FourierFeatures(nn.Module):
    """Learnable Fourier features of the diffusion step: [cos 2πtW, sin 2πtW], W ~ N(0, 0.2²)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(0.2 * torch.randn(dim // 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * t.float()[:, None] * self.w
        return torch.cat([f.cos(), f.sin()], dim=-1)


class Denoiser(nn.Module):
    """ε_θ(s, aₜ, t): predicts the noise in aₜ; input [aₜ, s, time embedding], as in the official code."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], time_dim: int):
        super().__init__()
        self.time_embed = nn.Sequential(FourierFeatures(time_dim), mlp(time_dim, (128,), 128, Mish))
        self.net = mlp(act_dim + obs_dim + 128, hidden_dims, act_dim, Mish)

    def forward(self, s: torch.Tensor, a_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) steps, or (1,) when the whole batch shares one step (then it is embedded once)."""
        return self.net(torch.cat([a_t, s, self.time_embed(t).expand(a_t.shape[0], -1)], dim=-1))


class EnsembleLinear(nn.Module):
    """E independent linear layers applied in one batched matmul: (E, B, in) -> (E, B, out)."""

    def __init__(self, num: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(num, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class BatchRenorm(nn.Module):
    """Batch renormalisation (Ioffe 2017) over the batch dimension of (E, B, D), as in CrossQ: in training mode the
    batch's statistics, corrected towards the running ones (r, d) after `warmup` updates; in eval mode the running
    statistics."""

    def __init__(self, num: int, dim: int, momentum: float = 0.01, eps: float = 1e-3, warmup: int = 100_000):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(num, 1, dim)), nn.Parameter(torch.zeros(num, 1, dim))
        self.register_buffer("running_mean", torch.zeros(num, 1, dim))
        self.register_buffer("running_var", torch.ones(num, 1, dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.momentum, self.eps, self.warmup = momentum, eps, warmup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running_std = (self.running_var + self.eps).sqrt()
        if not self.training:
            return (x - self.running_mean) / running_std * self.weight + self.bias
        mean, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
        std = (var + self.eps).sqrt()
        warm = (self.steps >= self.warmup).float()  # r = 1, d = 0 (plain batch norm) during the warm-up
        r = ((std / running_std).clamp(1 / 3, 3) * warm + 1 - warm).detach()
        d = ((mean - self.running_mean) / running_std).clamp(-5, 5).mul(warm).detach()
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
            self.steps += 1
        return ((x - mean) / std * r + d) * self.weight + self.bias


class TwinQ(nn.Module):
    """Q_φ1(s, a), Q_φ2(s, a) as one network with an ensemble dimension; forward returns (2, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num: int = 2, norm: str = "none"):
        super().__init__()
        dims = (obs_dim + act_dim, *hidden_dims)
        self.hidden = nn.ModuleList(EnsembleLinear(num, i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.out = EnsembleLinear(num, dims[-1], 1)
        self.norms = nn.ModuleList(BatchRenorm(num, d) if norm == "batch" else nn.Identity() for d in dims)
        self.num = num

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s, a], dim=-1).expand(self.num, -1, -1)
        for norm, layer in zip(self.norms, self.hidden):
            x = F.relu(layer(norm(x)))
        return self.out(self.norms[-1](x)).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------
# Replay buffer: preallocated float32 numpy arrays; actions are stored in the policy's [-1, 1] space.
# ---------------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    FIELDS = ("obs", "next_obs", "actions", "rewards", "terminated")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        need = 4 * capacity * (2 * obs_dim + act_dim + 2)  # bytes
        try:  # np.full, not np.zeros: it writes every page now, so a buffer too big for RAM fails here, not hours later
            if need > total_memory():
                raise MemoryError
            self.obs = np.full((capacity, obs_dim), 0, np.float32)
            self.next_obs = np.full((capacity, obs_dim), 0, np.float32)
            self.actions = np.full((capacity, act_dim), 0, np.float32)
            self.rewards = np.full(capacity, 0, np.float32)
            self.terminated = np.full(capacity, 0, np.float32)
        except MemoryError:
            fail(f"a replay buffer of {capacity:,} transitions needs {need / 2**30:.1f} GiB, more than this machine "
                 f"has; lower --buffer-size")
        self.capacity, self.size, self.pos, self.device = capacity, 0, 0, device

    def add(self, obs, next_obs, actions, rewards, terminated):
        """Store one transition per env; float64 observations become float32."""
        n = len(obs)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.next_obs[idx], self.actions[idx] = obs, next_obs, actions
        self.rewards[idx], self.terminated[idx] = rewards, terminated
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.size + n, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, batch_size)
        return {k: torch.from_numpy(getattr(self, k)[idx]).to(self.device) for k in self.FIELDS}

    def state_dict(self) -> dict:  # the filled rows only, as tensors (loads with torch.load(weights_only=True))
        return {"pos": self.pos, "size": self.size, **{k: torch.from_numpy(getattr(self, k)[: self.size]) for k in self.FIELDS}}

    def load_state_dict(self, state: dict):
        for k in self.FIELDS:
            getattr(self, k)[: state["size"]] = state[k].numpy()
        self.pos, self.size = state["pos"], state["size"]


# ---------------------------------------------------------------------------------------------------------------
# DDPM sampler (Ho et al. 2020, Alg. 2): a_T ~ N(0, I); a_{t-1} = (a_t - β_t/√(1-ᾱ_t)·ε_θ)/√α_t + σ_t z.
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Losses. Critic: clipped double-Q TD target. Actor: Q-score matching, ‖ε_θ(s, aₜ, t) + M_q·∇ₐQ(s, aₜ)/ρ‖².
# ---------------------------------------------------------------------------------------------------------------
def critic_loss(qf, qf_target, denoiser, sched, batch, args: Args):
    with torch.no_grad():
        next_a = ddpm_sample(denoiser, sched, batch["next_obs"], batch["actions"].shape[1], args.ddpm_temperature,
                             args.clip_sampler)  # a' ~ π(·|s')
        at_bounds = (next_a.abs() >= 1).float().mean()  # a saturated sampler puts most coordinates at ±1
        next_a = (next_a + args.target_noise * torch.randn_like(next_a)).clamp(-1, 1)
    if args.critic_norm == "batch":  # CrossQ: Q(s, a) and Q(s', a') in one pass of the critic, no target critic
        q, next_q = qf(torch.cat([batch["obs"], batch["next_obs"]]), torch.cat([batch["actions"], next_a])).chunk(2, 1)
    else:
        q, next_q = qf(batch["obs"], batch["actions"]), qf_target(batch["next_obs"], next_a)  # Q, Q̄: (2, B)
    with torch.no_grad():
        y = batch["rewards"] + args.gamma * (1 - batch["terminated"]) * next_q.min(0).values  # min_i Q̄_i(s', a');
        # only `terminated` cuts the bootstrap
    per_q = ((q - y) ** 2).mean(1)
    return per_q.sum(), {"losses/qf1_loss": per_q[0].detach(), "losses/qf2_loss": per_q[1].detach(),
                         "losses/qf1_values": q[0].mean().detach(), "policy/next_action_at_bounds": at_bounds}


def qsm_loss(denoiser, qf, sched, batch, args: Args):
    a0, s = batch["actions"], batch["obs"]
    t = torch.randint(0, sched.T, (a0.shape[0],), device=a0.device)  # t ~ U{0..T-1}
    ab = sched.alpha_bars[t][:, None]
    a_t = ab.sqrt() * a0 + (1 - ab).sqrt() * torch.randn_like(a0)  # forward process q(aₜ|a₀)
    with torch.no_grad():  # ∇ₐQ(s, aₜ) of the mean of both critics: a fixed target, no gradient reaches the critics
        dq_da = torch.func.grad(lambda a: qf(s, a).mean(0).sum())(a_t)
        rho = dq_da.pow(2).mean().sqrt() + 1e-8 if args.normalize_q_grad else 1.0  # ρ = RMS(∇ₐQ), Q's scale (paper: 1)
    eps = denoiser(s, a_t, t)  # ε_θ(s, aₜ, t)
    loss = ((eps + args.q_grad_scale * dq_da / rho) ** 2).sum(-1).mean()  # ‖ε_θ + M_q ∇ₐQ/ρ‖²
    with torch.no_grad():  # diagnostics: the score -ε_θ should point along ∇ₐQ
        align = F.cosine_similarity(-eps, dq_da, dim=-1).mean()
        diag = {"losses/actor_loss": loss.detach(), "qsm/score_alignment": align,
                "qsm/dq_da_norm": dq_da.norm(dim=-1).mean(), "qsm/eps_norm": eps.norm(dim=-1).mean()}
    return loss, diag


@torch.no_grad()
def policy_diagnostics(denoiser, qf, sched, s: torch.Tensor, act_dim: int, args: Args) -> dict[str, torch.Tensor]:
    """What the acting sampler does at buffer states: the share of action coordinates it puts at ±1, and how often
    its action beats a uniform random one under Q (≈ 1 for a policy that follows Q; ≤ 0.5 for a degenerate one)."""
    a = ddpm_sample(denoiser, sched, s, act_dim, args.ddpm_temperature, args.clip_sampler)
    qf.eval()
    q_policy, q_random = qf(s, a).mean(0), qf(s, torch.rand_like(a) * 2 - 1).mean(0)
    qf.train()
    return {"policy/action_at_bounds": (a.abs() >= 1).float().mean(),
            "policy/beats_random": (q_policy > q_random).float().mean()}


@torch.no_grad()
def polyak_update(net: nn.Module, target: nn.Module, tau: float):
    torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), tau)  # φ̄ ← (1-τ)φ̄ + τφ


def make_update(denoiser, denoiser_target, qf, qf_target, q_opt, actor_opt, sched, args: Args):
    """Returns update(batch): a critic TD step, a QSM actor step and Polyak steps; metrics stay tensors (no host
    sync). With --compile the two losses, forward and backward, run as inductor-compiled graphs."""
    c_loss, a_loss = (torch.compile(critic_loss), torch.compile(qsm_loss)) if args.compile else (critic_loss, qsm_loss)

    def update(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q_loss, q_info = c_loss(qf, qf_target, denoiser_target, sched, batch, args)
        q_opt.zero_grad()
        q_loss.backward()
        q_opt.step()
        qf.eval()  # ∇ₐQ with the critic's running statistics (only batch renormalisation has any)
        actor_loss, a_info = a_loss(denoiser, qf, sched, batch, args)
        qf.train()
        actor_opt.zero_grad()
        actor_loss.backward()
        actor_opt.step()
        if args.critic_norm != "batch":
            polyak_update(qf, qf_target, args.tau)
        if denoiser_target is not denoiser:
            polyak_update(denoiser, denoiser_target, args.actor_tau)
        return {**q_info, **a_info}

    return update


# ---------------------------------------------------------------------------------------------------------------
# Input checks and environment helpers: everything that can fail, fails before training, in one line.
# ---------------------------------------------------------------------------------------------------------------
def fail(msg: str):
    sys.exit(f"qsm.py: error: {msg}")  # one line on stderr, exit status 1


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or ['(no message)'])[0]}"


def check_args(args: Args):
    a = args
    checks = [
        (0 <= a.seed < 2**31, f"--seed must be in [0, 2^31) (got {a.seed})"),
        (a.num_envs >= 1 and a.batch_size >= 1 and a.utd_ratio >= 1 and a.diffusion_steps >= 1,
         "--num-envs, --batch-size, --utd-ratio and --diffusion-steps must be ≥ 1"),
        (a.batch_size <= a.buffer_size, f"--batch-size {a.batch_size} is larger than --buffer-size {a.buffer_size}"),
        (a.total_timesteps % a.num_envs == 0,
         f"--total-timesteps {a.total_timesteps} is not a multiple of --num-envs {a.num_envs}"),
        (a.diffusion_steps <= 1000 and a.num_envs <= 4096, "--diffusion-steps must be ≤ 1000 (DDPM's T) and "
         "--num-envs ≤ 4096: each costs memory and time per action"),
        (network_bytes(a) < total_memory() / 4, f"networks of widths {a.actor_hidden_dims}, {a.critic_hidden_dims} "
         f"and --time-dim {a.time_dim} need {network_bytes(a) / 2**30:.1f} GiB with their optimizer states, more than "
         f"a quarter of this machine's memory"),
        (a.learning_starts >= 0, f"--learning-starts must be ≥ 0 (got {a.learning_starts})"),
        (a.eval_only or a.learning_starts < a.total_timesteps,
         f"--learning-starts {a.learning_starts} ≥ --total-timesteps {a.total_timesteps}: no update would run"),
        (0 < a.tau <= 1 and 0 < a.actor_tau <= 1 and 0 <= a.gamma <= 1,
         "need 0 < --tau ≤ 1, 0 < --actor-tau ≤ 1 and 0 ≤ --gamma ≤ 1"),
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
        (not a.eval_only or a.checkpoint, "--eval-only needs --checkpoint PATH"),
        (not a.track or importlib.util.find_spec("wandb"), "--track needs wandb: pip install wandb"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(msg)


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def network_bytes(a: Args, obs_act: int = 1024) -> int:
    """A bound on the bytes of parameters, gradients, Adam moments and targets (×5), for observations and actions
    of up to obs_act numbers (the env is not made yet)."""
    widths = lambda first, hidden: list(zip((first, *hidden), (*hidden, obs_act)))  # noqa: E731
    params = sum(i * o for i, o in widths(obs_act + 128, a.actor_hidden_dims) + widths(obs_act, a.critic_hidden_dims) * 2)
    return 5 * 4 * (params + 128 * a.time_dim)


TIME_LIMIT = 1000  # steps per episode for envs registered without one (MuJoCo's and DeepMind Control's length)


def make_env(env_id: str, render: bool = False) -> gym.Env:
    """The one place envs are made (training, evaluation, checks). DeepMind Control's dict observations are
    flattened. Every episode ends: an env registered without a time limit gets TIME_LIMIT steps (a truncation, so
    the critic target still bootstraps)."""
    try:
        if env_id.startswith("dm_control/"):  # DeepMind Control through shimmy, whose import registers its envs and
            os.environ.setdefault("MUJOCO_GL", "off")  # imports dm_control, which picks its renderer then: none, unless
            import shimmy  # check_env has chosen one for --capture-video

            gym.register_envs(shimmy)
        env = gym.make(env_id, **({"render_mode": "rgb_array"} if render else {}))
    except Exception as e:
        fail(f"cannot make environment {env_id!r}{' to render (--capture-video)' * render}: {first_line(e)}")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    return env if env.spec.max_episode_steps else gym.wrappers.TimeLimit(env, TIME_LIMIT)


def check_env(args: Args) -> tuple[int, int]:
    """Make, reset and step the training env, and the evaluation env if it differs (rendering with --capture-video),
    so that what would fail at the first evaluation fails now. Returns (observation size, action size)."""
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless OpenGL for MuJoCo (or osmesa); read at the first render
        if importlib.util.find_spec("moviepy") is None:  # gymnasium's RecordVideo writes mp4 files with it
            fail("--capture-video needs moviepy (pip install -r requirements.txt)")
    for render in sorted({False, args.capture_video}):
        env = make_env(args.env_id, render)
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
            if render and not isinstance(env.render(), np.ndarray):
                raise RuntimeError("render() gave no frame")
        except Exception as e:
            hint = " (--capture-video: see README, Long runs)" if render else ""
            fail(f"{args.env_id}: reset/step{'/render' * render} failed: {first_line(e)}{hint}")
        env.close()
    return obs_space.shape[0], act.shape[0]


def to_env_action(a: np.ndarray, space: gym.spaces.Box) -> np.ndarray:
    """Map the policy's a ∈ [-1, 1] linearly onto the env's Box [low, high]."""
    return space.low + (a + 1) * 0.5 * (space.high - space.low)


def check_finite(source: str, step: int, last_ckpt: str, **fields: np.ndarray):
    """Stop before a NaN or Inf reaches the env or the replay buffer (and through it every later checkpoint), checked
    as float32, the buffer's type (1e39 is finite in float64, Inf in float32)."""
    for name, x in fields.items():
        with np.errstate(over="ignore"):
            finite = np.isfinite(np.asarray(x, dtype=np.float32)).all()
        if not finite:
            fail(f"non-finite {name.replace('_', ' ')} from {source} at step {step}; it was not stored; last good "
                 f"checkpoint: {last_ckpt}")


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


def evaluate(denoiser, sched, args: Args, device, stop: Stop, video: Optional[tuple[str, str]] = None):
    """Returns of --eval-episodes episodes of DDPM-sampled actions without exploration noise, or None if a stop
    signal came first. video = (folder, file prefix): record the first episode."""
    env = make_env(args.env_id, render=video is not None)
    if video:
        env = gym.wrappers.RecordVideo(env, video[0], episode_trigger=lambda ep: ep == 0, name_prefix=video[1])
    returns = []
    while len(returns) < args.eval_episodes and not stop:
        obs, _ = env.reset(seed=args.seed + 10_000 + len(returns))
        done, ep_return = False, 0.0
        while not (done or stop):
            s = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
            a = ddpm_sample(denoiser, sched, s, env.action_space.shape[0], args.ddpm_temperature, args.clip_sampler)
            obs, r, terminated, truncated, _ = env.step(to_env_action(a[0].cpu().numpy(), env.action_space))
            check_finite(f"{args.env_id} in evaluation episode {len(returns) + 1}", "its end", "unchanged", reward=r,
                         observation=obs)
            ep_return += float(r)
            done = terminated or truncated
        returns.append(ep_return)
    env.close()
    return None if stop else returns


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: everything a run needs to continue, written atomically; all but the envs load with weights_only.
# ---------------------------------------------------------------------------------------------------------------
class RNG:
    """The run's random streams: numpy's (random actions, batches) and torch's (everything else)."""

    def __init__(self, seed: int, device: torch.device):
        self.np, self.cuda = np.random.default_rng(seed), device.type == "cuda"

    def state_dict(self) -> dict:
        return {"np": self.np.bit_generator.state, "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if self.cuda else None}

    def load_state_dict(self, state: dict):
        self.np.bit_generator.state = state["np"]
        torch.set_rng_state(state["torch"])
        if self.cuda and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"])


def env_state(envs: gym.vector.VectorEnv) -> Optional[bytes]:
    """The vector env pickled, where pickling keeps the episodes in flight. Gymnasium's MuJoCo envs are EzPickle:
    they pickle only their constructor arguments, so for them this is None and a resumed run starts new episodes."""
    if any(isinstance(e.unwrapped, gym.utils.EzPickle) for e in envs.unwrapped.envs):
        return None
    try:
        return pickle.dumps(envs)
    except (pickle.PicklingError, TypeError, AttributeError):
        return None


def load_checkpoint(path: str, training: bool = False) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read checkpoint {path!r}: {first_line(e)}")
    if not isinstance(ckpt, dict) or not {"args", "dims", "denoiser", "qf"} <= ckpt.keys():
        fail(f"{path} is not a checkpoint of this qsm.py (a file of another program, or of an older version)")
    if training and "rb" not in ckpt:
        fail(f"{path} holds only networks (--save-model); --resume needs a runs/<run>/checkpoint.pt")
    missing = {"global_step", "num_updates", "recent_returns", "obs", "envs", "run_name"} - ckpt.keys() if training else ()
    if missing:
        fail(f"{path} does not fit this qsm.py: it has no {', '.join(sorted(missing))}")
    return ckpt


def check_fits(ckpt: dict, path: str, env_id: str, dims: tuple[int, int]):
    made_for, ours = (ckpt["args"]["env_id"], *ckpt["dims"]), (env_id, *dims)
    if made_for != ours:
        fail(f"{path} was made for {made_for[0]} (obs {made_for[1]}, act {made_for[2]}), not {env_id} (obs "
             f"{dims[0]}, act {dims[1]}); pass --env-id {made_for[0]}")


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
            path = f"runs/{run_name}" if i == 1 else f"runs/{run_name}_{i}"
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)  # atomic: of two runs asking for one name, one gets it
                return path
    except OSError as e:
        fail(f"cannot make a run folder in {os.getcwd()}/runs: {first_line(e)}")


def lock_run_dir(run_dir: str):
    """One process per run: an OS lock on {run_dir}/lock, released when the file closes or the process dies."""
    try:
        f = open(f"{run_dir}/lock", "w")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"another process is running the run in {run_dir}; wait for it to end or stop it first")
    except OSError as e:
        fail(f"cannot write to the run folder {run_dir}: {first_line(e)}")
    return f


def restore(objects: dict, state: dict, path: str):
    """load_state_dict for each object; a checkpoint of another qsm.py version fails in one line saying what differs."""
    for k, obj in objects.items():
        if k not in state:
            fail(f"{path} does not fit this qsm.py: it has no {k!r}")
        if isinstance(obj, nn.Module):
            ours, theirs = obj.state_dict(), state[k]
            diff = [f"{n} missing" for n in ours.keys() - theirs.keys()] + [f"{n} unknown" for n in theirs.keys() - ours.keys()]
            diff += [f"{n} is {tuple(theirs[n].shape)}, here {tuple(ours[n].shape)}" for n in ours.keys() & theirs.keys()
                     if theirs[n].shape != ours[n].shape]
            if diff:
                fail(f"{path} does not fit this qsm.py: in {k}, {'; '.join(sorted(diff)[:4])}")
        try:
            obj.load_state_dict(state[k])
        except Exception as e:
            fail(f"{path} does not fit this qsm.py: {k}: {first_line(e)}")


# ---------------------------------------------------------------------------------------------------------------
# Training loop.
# ---------------------------------------------------------------------------------------------------------------
def main(args: Args):
    with Stop() as stop:
        return train(*prepare(args), stop)


def prepare(args: Args):
    """The flags (from the checkpoint with --resume), the env and the checkpoints, all checked before anything runs.
    Returns (args, the checkpoint to resume or None, the checkpoint to load networks from or None, obs size, act size)."""
    resume = load_checkpoint(args.resume, training=True) if args.resume else None
    if resume:  # a resumed run continues with the flags it was started with
        ignored = [k for k, v in vars(args).items() if k != "resume" and v != getattr(Args, k)]
        if ignored:
            print(f"qsm.py: --resume takes every flag from the checkpoint; ignoring {', '.join(ignored)}", file=sys.stderr)
        args = Args(**{**resume["args"], "resume": args.resume})
    check_args(args)
    obs_dim, act_dim = check_env(args)
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    for c, path in ((resume, args.resume), (ckpt, args.checkpoint)):
        if c:
            check_fits(c, path, args.env_id, (obs_dim, act_dim))
    if ckpt:  # the architecture comes from the checkpoint
        for k in ("actor_hidden_dims", "critic_hidden_dims", "critic_norm", "time_dim", "diffusion_steps",
                  "beta_schedule"):
            setattr(args, k, ckpt["args"].get(k, getattr(Args, k)))
    return args, resume, ckpt, obs_dim, act_dim


def train(args: Args, resume: Optional[dict], ckpt: Optional[dict], obs_dim: int, act_dim: int, stop: Stop):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.cuda and not torch.cuda.is_available():
        print("qsm.py: --cuda requested but no GPU found; running on CPU", file=sys.stderr)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    sched = Schedule(args.beta_schedule, args.diffusion_steps, device)
    denoiser = Denoiser(obs_dim, act_dim, args.actor_hidden_dims, args.time_dim).to(device)
    qf = TwinQ(obs_dim, act_dim, args.critic_hidden_dims, norm=args.critic_norm).to(device)
    qf_target = TwinQ(obs_dim, act_dim, args.critic_hidden_dims, norm=args.critic_norm).to(device)
    if ckpt:  # the policy that acted, and its critic
        restore(dict(denoiser=denoiser, qf=qf), dict(denoiser=ckpt.get("denoiser_target", ckpt["denoiser"]),
                                                     qf=ckpt["qf"]), args.checkpoint)
    qf_target.load_state_dict(qf.state_dict())
    denoiser_target = copy.deepcopy(denoiser) if args.actor_tau < 1 else denoiser  # the denoiser that acts

    if args.eval_only:
        video = (f"videos/{args.env_id.replace('/', '-')}__eval__{int(time.time())}", "eval") if args.capture_video else None
        returns = evaluate(denoiser, sched, args, device, stop, video)
        print(f"eval {args.env_id}: return {np.mean(returns):.1f} ± {np.std(returns):.1f} over {len(returns)} episodes")
        return {"eval_returns": returns}

    q_opt = torch.optim.Adam(qf.parameters(), lr=args.critic_lr, fused=True)  # fused: one kernel for all params
    actor_opt = torch.optim.Adam(denoiser.parameters(), lr=args.actor_lr, fused=True)
    K = args.actor_lr_decay_steps  # cosine decay lr·½(1 + cos(π·min(k, K)/K)), as optax.cosine_decay_schedule
    actor_sched = torch.optim.lr_scheduler.LambdaLR(
        actor_opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, K) / K)) if K > 0 else 1.0)
    update = make_update(denoiser, denoiser_target, qf, qf_target, q_opt, actor_opt, sched, args)
    sample = torch.compile(ddpm_sample) if args.compile else ddpm_sample
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim, device)
    rng = RNG(args.seed, device)

    # Gymnasium's same-step autoreset: every step is a transition; an ended episode's last obs is in infos["final_obs"]
    # (functools.partial, not a lambda, so that the vector env can be pickled into checkpoints)
    envs = gym.vector.SyncVectorEnv([functools.partial(make_env, args.env_id) for _ in range(args.num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    act_space = envs.single_action_space
    global_step, num_updates, recent_returns, metrics = 0, 0, deque(maxlen=10), {}

    # what a checkpoint holds: these objects' state_dicts, and `checkpoint()` below; save and resume both read it here
    stateful = dict(denoiser=denoiser, denoiser_target=denoiser_target, qf=qf, qf_target=qf_target, q_opt=q_opt,
                    actor_opt=actor_opt, actor_sched=actor_sched, rb=rb, rng=rng)
    if resume:
        restore(stateful, resume, args.resume)
        global_step, num_updates = resume["global_step"], resume["num_updates"]
        recent_returns.extend(resume["recent_returns"])
    if resume and resume["envs"] is not None:  # the episodes in flight continue exactly
        envs.close()
        envs, obs = pickle.loads(resume["envs"]), resume["obs"].numpy()  # (pickle runs code: resume only your own files)
    else:  # a fresh run, or envs that cannot be saved (MuJoCo): new episodes, seeded by the step
        obs, _ = envs.reset(seed=args.seed + global_step)
    last_ckpt = args.resume or "none yet"
    check_finite(args.env_id, global_step, last_ckpt, reset_observation=obs)
    if args.compile:  # compile now (≈20 s on CPU) rather than at the first update, then put every state back
        saved = copy.deepcopy({k: obj.state_dict() for k, obj in stateful.items() if k != "rb"})
        print("qsm.py: compiling the update and the sampler (--no-compile skips this)", file=sys.stderr)
        update({k: torch.zeros(args.batch_size, *getattr(rb, k).shape[1:], device=device) for k in rb.FIELDS})
        sample(denoiser_target, sched, torch.zeros(args.num_envs, obs_dim, device=device), act_dim)
        for k, state in saved.items():
            stateful[k].load_state_dict(state)

    run_dir = (os.path.dirname(args.resume) or ".") if resume else make_run_dir(  # a resume stays in its folder
        f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}")
    run_name = resume["run_name"] if resume else os.path.basename(run_dir)
    lock = lock_run_dir(run_dir)
    ckpt_path = f"{run_dir}/checkpoint.pt"

    def checkpoint() -> dict:
        return {"args": vars(args), "dims": (obs_dim, act_dim), "run_name": run_name,
                **{k: obj.state_dict() for k, obj in stateful.items()}, "global_step": global_step,
                "num_updates": num_updates, "recent_returns": list(recent_returns), "obs": torch.from_numpy(obs),
                "envs": env_state(envs)}

    def save(reason: str):
        nonlocal last_ckpt
        for name, net in (("denoiser", denoiser), ("qf", qf)):
            if not all(torch.isfinite(p).all() for p in net.parameters()):
                fail(f"non-finite parameters in {name} at step {global_step}; last good checkpoint: {last_ckpt}")
        save_checkpoint(ckpt_path, checkpoint())
        last_ckpt = ckpt_path
        writer.add_text("checkpoints", f"{reason}: {ckpt_path}", global_step)

    def every(freq: int) -> bool:  # did this iteration's steps cross a multiple of freq?
        return freq > 0 and global_step // freq != (global_step - args.num_envs) // freq

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    # on resume, purge_step drops what the interrupted run logged after its checkpoint, so the curve has no overlap
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if resume else None)
    if not resume:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    pbar = tqdm.tqdm(total=args.total_timesteps, initial=global_step, unit="step", dynamic_ncols=True)
    start_step, start_time, stop.training = global_step, time.time(), True
    try:
        while global_step < args.total_timesteps and not stop:
            # act: uniform random before learning starts, then DDPM sample + N(0, σ²) exploration noise
            if global_step < args.learning_starts:
                actions = rng.np.uniform(-1, 1, (args.num_envs, act_dim)).astype(np.float32)
            else:
                s = torch.as_tensor(obs, dtype=torch.float32, device=device)
                a = sample(denoiser_target, sched, s, act_dim, args.ddpm_temperature, args.clip_sampler)
                actions = (a + args.exploration_noise * torch.randn_like(a)).clamp(-1, 1).cpu().numpy()
            check_finite("the policy", global_step + 1, last_ckpt, action=actions)
            next_obs, rewards, terminations, truncations, infos = envs.step(to_env_action(actions, act_space))
            real_next_obs = next_obs.copy()  # s' of an episode that ended is its final obs, not the next reset
            for i in np.flatnonzero(infos.get("_final_obs", [])):
                real_next_obs[i] = infos["final_obs"][i]
            check_finite(args.env_id, global_step + 1, last_ckpt, reward=rewards, observation=real_next_obs,
                         reset_observation=next_obs)
            rb.add(obs, real_next_obs, actions, rewards, terminations)  # truncated is not terminated: it bootstraps
            obs = next_obs
            global_step += args.num_envs
            pbar.update(args.num_envs)
            for i in np.flatnonzero(infos.get("_episode", [])):
                recent_returns.append(float(infos["episode"]["r"][i]))
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], global_step)

            # learn: UTD updates per env step, each a critic step, a QSM actor step and a Polyak step
            if global_step > args.learning_starts:
                for _ in range(args.utd_ratio * args.num_envs):
                    batch = rb.sample(args.batch_size, rng.np)
                    metrics = update(batch)
                    actor_sched.step()
                    num_updates += 1
                    if not torch.isfinite(torch.stack(list(metrics.values()))).all():  # NaN/Inf guard: one host sync
                        bad = ", ".join(f"{k} = {float(v)}" for k, v in metrics.items() if not math.isfinite(float(v)))
                        fail(f"non-finite {bad} at step {global_step} (update {num_updates}); "
                             f"last good checkpoint: {last_ckpt} (resume with --resume PATH)")

            if every(args.log_freq) or global_step >= args.total_timesteps:  # and the last step: a run's end is logged
                sps = int((global_step - start_step) / (time.time() - start_time))
                writer.add_scalar("charts/SPS", sps, global_step)
                for k, v in metrics.items():
                    writer.add_scalar(k, float(v), global_step)
                if metrics:
                    writer.add_scalar("charts/actor_lr", actor_opt.param_groups[0]["lr"], global_step)
                    for k, v in policy_diagnostics(denoiser_target, qf, sched, batch["obs"], act_dim, args).items():
                        writer.add_scalar(k, float(v), global_step)
                pbar.set_postfix(ret=f"{np.mean(recent_returns):.1f}" if recent_returns else "n/a", sps=sps, refresh=False)
            if every(args.eval_freq):
                video = (f"videos/{run_name}", f"step{global_step}") if args.capture_video else None
                returns = evaluate(denoiser_target, sched, args, device, stop, video)
                if returns is not None:  # None: cut by a stop signal
                    writer.add_scalar("eval/episodic_return", np.mean(returns), global_step)
            if every(args.checkpoint_freq):
                save("every --checkpoint-freq")

        if stop:
            sig = signal.Signals(stop.signum).name
            save(sig)
            print(f"\nqsm.py: stopped by {sig} at step {global_step}; checkpoint saved, continue with: "
                  f"python qsm.py --resume {ckpt_path}", file=sys.stderr)
            sys.exit(128 + stop.signum)  # the shell's code for "killed by this signal": the run did not finish
        if args.save_model:
            path = f"{run_dir}/qsm.pt"
            save_checkpoint(path, {"args": vars(args), "dims": (obs_dim, act_dim), "qf": qf.state_dict(),
                                   "denoiser": denoiser_target.state_dict()})  # the denoiser that acts
            print(f"model saved to {path}; evaluate it with: python qsm.py --env-id {args.env_id} --checkpoint {path} --eval-only")
    except Exception as e:  # an env that raises, a full disk, ...: one line; the last checkpoint stays whole
        if os.environ.get("QSM_DEBUG"):
            raise
        fail(f"{first_line(e)} at step {global_step}; last good checkpoint: {last_ckpt} (QSM_DEBUG=1 shows the "
             f"traceback)")
    finally:
        pbar.close()
        envs.close()
        with contextlib.suppress(Exception):  # a full disk has been reported above
            writer.close()  # flushes the event file
        lock.close()
    return {"rb": rb, "denoiser": denoiser, "qf": qf, "run_dir": run_dir, "num_updates": num_updates,
            "global_step": global_step, "episodic_returns": list(recent_returns)}


if __name__ == "__main__":
    main(tyro.cli(Args))
