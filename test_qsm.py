"""Tests of qsm.py: the algorithm's pieces, the environment handling, the whole loop, and learning on Pendulum."""
import copy
import csv
import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qsm

HERE = Path(__file__).parent
torch.set_num_threads(1)  # small networks: a second thread would only contend with the subprocesses tests start
os.environ["OMP_NUM_THREADS"] = "1"  # and those subprocesses (qsm.py, the benchmark scripts) get one thread each


# --- small environments used to probe the loop ----------------------------------------------------------------
class ProbeEnv(gym.Env):
    """obs = [step counter, 1 if this step terminated, the env action received]; terminates after a random 2..8
    steps, and its registration truncates at 5, so episodes end by either. Box bounds are asymmetric."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float64)
    action_space = gym.spaces.Box(np.array([0.0, -1.0], np.float32), np.array([2.0, 5.0], np.float32))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.end = 0, int(self.np_random.integers(2, 9))
        return np.zeros(4), {}

    def step(self, action):
        self.t += 1
        terminated = self.t >= self.end
        obs = np.array([self.t, float(terminated), *action], dtype=np.float64)
        return obs, -float(np.sum(action**2)), terminated, False, {}


class BadEnv(gym.Env):
    def __init__(self, obs_space, act_space):
        self.observation_space, self.action_space = obs_space, act_space


gym.register("QsmProbe-v0", entry_point=ProbeEnv, max_episode_steps=5)
gym.register("QsmUnboundedAction-v0", entry_point=lambda: BadEnv(
    gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-np.inf, np.inf, (2,))))
gym.register("QsmImageObs-v0", entry_point=lambda: BadEnv(
    gym.spaces.Box(0, 1, (8, 8)), gym.spaces.Box(-1, 1, (2,))))


def small_args(**kw) -> qsm.Args:
    """Small runs for the tests of the machinery. T = 5 halves the sampler's cost and only shortens its loop; the
    learning and sampler tests run the default T."""
    base = dict(env_id="Pendulum-v1", total_timesteps=300, learning_starts=100, batch_size=32, buffer_size=10_000,
                diffusion_steps=5, actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), eval_freq=0, log_freq=50,
                cuda=False, compile=False)
    base.update(kw)
    return qsm.Args(**base)


# --- shapes and dtypes -----------------------------------------------------------------------------------------
def test_shapes_and_dtypes():
    torch.manual_seed(0)
    B, S, A, T = 7, 5, 3, 5
    sched = qsm.Schedule(T, torch.device("cpu"))
    den = qsm.Denoiser(S, A, (32, 32), 64)
    qf = qsm.TwinQ(S, A, (32, 32))
    s, a = torch.randn(B, S), torch.rand(B, A) * 2 - 1
    eps = den(s, a, torch.randint(0, T, (B,)))
    assert eps.shape == (B, A) and eps.dtype == torch.float32
    q1, q2 = qf(s, a)
    assert q1.shape == (B,) and q2.shape == (B,) and not torch.equal(q1, q2)  # two independent critics
    out = qsm.ddpm_sample(den, sched, s, A)
    assert out.shape == (B, A) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1

    rb = qsm.ReplayBuffer(10, S, A, torch.device("cpu"))
    obs = np.random.randn(2, S)  # float64, as MuJoCo gives
    rb.add(obs, obs + 1, np.zeros((2, A), np.float32), np.ones(2), np.array([False, True]))
    batch = rb.sample(4, np.random.default_rng(0))
    assert rb.size == 2 and rb.obs.dtype == np.float32
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {"obs": (4, S), "next_obs": (4, S), "actions": (4, A), "rewards": (4,), "terminated": (4,)}
    assert all(v.dtype == torch.float32 for v in batch.values())


def test_layer_norm_critic():
    """LayerNorm after each hidden layer: Q does not change when the first layer's output is scaled."""
    torch.manual_seed(0)
    s, a = torch.randn(64, 5), torch.rand(64, 3) * 2 - 1
    qf = qsm.TwinQ(5, 3, (32, 32), norm="layer")
    q = qf(s, a)
    with torch.no_grad():
        qf.hidden[0].weight.mul_(10), qf.hidden[0].bias.mul_(10)
    torch.testing.assert_close(qf(s, a), q, rtol=1e-4, atol=1e-4)
    plain = qsm.TwinQ(5, 3, (32, 32))  # without it, the same scaling changes Q
    q = plain(s, a)
    with torch.no_grad():
        plain.hidden[0].weight.mul_(10), plain.hidden[0].bias.mul_(10)
    assert not torch.allclose(plain(s, a), q, rtol=1e-2)


def test_obs_norm_keeps_the_running_moments_and_compiled_code_reads_them(monkeypatch):
    """--obs-norm: the moments of every observation merged so far, in batches of any size (one per env step with one
    env), as numpy's over all of them to float32 precision; a compiled critic reads the statistics as they are now,
    not as they were when it was traced."""
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)  # scalar kernels: a shorter compile
    rng = np.random.default_rng(0)
    chunks = [rng.normal(loc=[0.0, 5.0, -300.0], scale=[0.1, 2.0, 40.0], size=(n, 3)) for n in (1, 1, 7, 300, 1)]
    norm = qsm.ObsNorm(3)
    for c in chunks:
        norm.update(c)
    seen = np.concatenate(chunks)
    np.testing.assert_allclose(norm.mean.numpy(), seen.mean(0), rtol=1e-4)
    np.testing.assert_allclose(norm.var.numpy(), seen.var(0), rtol=1e-3)
    z = norm(torch.as_tensor(seen, dtype=torch.float32))
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-3)
    np.testing.assert_allclose(z.std(0, correction=0).numpy(), 1, atol=1e-3)

    torch.manual_seed(0)
    qf = qsm.TwinQ(3, 1, (16,), norm="layer", obs_norm=norm)
    s, a = torch.as_tensor(seen[:8], dtype=torch.float32), torch.zeros(8, 1)
    compiled = torch.compile(qf)
    torch.testing.assert_close(compiled(s, a), qf(s, a))
    before = qf(s, a)
    norm.update(rng.normal(loc=[1.0, 50.0, 0.0], size=(100, 3)))  # the statistics move: so must Q
    assert not torch.allclose(qf(s, a), before, atol=1e-3)
    torch.testing.assert_close(compiled(s, a), qf(s, a))


def test_obs_norm_run_shares_one_normaliser_and_saves_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(obs_norm=True, total_timesteps=200, learning_starts=100))
    norm, rb = out["denoiser"].obs_norm, out["rb"]
    assert out["qf"].obs_norm is norm and out["qf_target"].obs_norm is norm  # one set of statistics for all three
    assert norm.count.item() == 200 and out["num_updates"] == 200
    np.testing.assert_allclose(norm.mean.numpy(), rb.obs[:200].mean(0), rtol=1e-4, atol=1e-5)  # the stored states
    saved = torch.load(f"{out['run_dir']}/checkpoint.pt", weights_only=True)
    for net in ("denoiser", "qf", "qf_target"):
        assert torch.equal(saved[net]["obs_norm.mean"], norm.mean) and torch.equal(saved[net]["obs_norm.var"], norm.var)
    # --eval-only builds the policy with the checkpoint's normaliser, whatever the flag says
    ev = qsm.main(qsm.Args(env_id="Pendulum-v1", eval_only=f"{out['run_dir']}/checkpoint.pt", obs_norm=False,
                           eval_episodes=1, cuda=False, compile=False))
    assert len(ev["eval_returns"]) == 1


def test_our_mish_is_torchs():
    x = torch.linspace(-30, 30, 100_001)
    torch.testing.assert_close(qsm.Mish()(x), nn.Mish()(x), rtol=1e-6, atol=1e-6)


def test_replay_buffer_wraps_around():
    rb = qsm.ReplayBuffer(3, 1, 1, torch.device("cpu"))
    for i in range(5):
        rb.add(np.array([[i]]), np.array([[i + 1]]), np.zeros((1, 1)), np.array([i]), np.array([False]))
    assert rb.size == 3 and sorted(rb.rewards.tolist()) == [2.0, 3.0, 4.0]


# --- noise schedule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 5, 50])
def test_vp_schedule_matches_official_formula(T):
    # β_t = 1 - exp(-b_min/T - ½(b_max - b_min)(2t - 1)/T²), t = 1..T, b_min = 0.1, b_max = 10
    sched = qsm.Schedule(T, torch.device("cpu"))
    expected = [1 - np.exp(-0.1 / T - 0.5 * 9.9 * (2 * t - 1) / T**2) for t in range(1, T + 1)]
    np.testing.assert_allclose(sched.betas.numpy(), expected, rtol=1e-6)
    assert ((sched.betas > 0) & (sched.betas < 1)).all() and (sched.alpha_bars[1:] < sched.alpha_bars[:-1]).all()
    assert torch.allclose(sched.alpha_bars, torch.cumprod(1 - sched.betas, 0))


# --- the QSM loss against analytic critics -----------------------------------------------------------------------
class AnalyticQ(nn.Module):
    """Both 'critics' are the same fixed function q_fn(s, a); shaped (2, B) like qsm.TwinQ."""

    def __init__(self, q_fn):
        super().__init__()
        self.q_fn = q_fn

    def forward(self, s, a):
        return torch.stack([self.q_fn(s, a)] * 2)


def train_qsm(q_fn, obs_dim, act_dim, steps, seed=0, sample_states=None, **flags):
    torch.manual_seed(seed)
    args = qsm.Args(**flags)  # the default QSM flags: M_q, normalized ∇ₐQ, T = 10, vp schedule (a smaller, faster net)
    sched = qsm.Schedule(args.diffusion_steps, torch.device("cpu"))
    den = qsm.Denoiser(obs_dim, act_dim, (128, 128), 64)
    untrained = qsm.Denoiser(obs_dim, act_dim, (128, 128), 64)
    untrained.load_state_dict(den.state_dict())
    opt = torch.optim.Adam(den.parameters(), lr=1e-3)
    qf = AnalyticQ(q_fn)
    for _ in range(steps):
        s = sample_states(256) if sample_states else torch.randn(256, obs_dim)
        batch = {"obs": s, "actions": torch.rand(256, act_dim) * 2 - 1}  # buffer actions: uniform in [-1, 1]
        loss, _ = qsm.qsm_loss(den, qf, sched, batch, args)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return den, untrained, sched, args


# Critic scales: Q = -k‖a - μ(s)‖² with k = 0.03, 0.3, 3 gives a mean ‖∇ₐQ‖ of ≈ 0.06, 0.6 and 6 (max ≈ 15) at the
# noised buffer actions: DeepMind Control's range (rewards ≤ 1/step) to Gym MuJoCo's (≈ 5/step). Default QSM flags,
# whose target is the same at every scale: the sampler tests train at k = 3 and assert that sameness for the others.
SCALES = [0.03, 0.3, 3.0]
# The sampler tests' thresholds; benchmarks/sampler_check.py reports the same checks for any flags.
MIN_ALIGNMENT = 0.96  # cosine of -ε_θ and ∇ₐQ; 0.96 at T = 10: benchmarks/README.md, The Q-score target
MAX_DISTANCE = 1 / 3  # mean distance of sampled actions to argmax Q, as a share of uniform random actions'
MAX_AT_BOUNDS = 0.1  # share of action coordinates at ±1 (a saturated sampler puts most of them there)
MIN_MODE, MAX_VALLEY = 0.25, 0.1  # the bandit: share of samples near each maximum, and near the valley between


def share_near(a: torch.Tensor, x: float) -> float:
    """The bandit's measure: the share of sampled actions within 0.2 of x (a maximum, or the valley at 0)."""
    return ((a - x).abs() < 0.2).float().mean().item()


W_MU = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))


def mu(s):  # argmax of the state-dependent critics below: a smooth map from 4-D states into [-0.6, 0.6]²
    return 0.6 * torch.tanh(s @ W_MU)


def quadratic_q(k):
    return lambda s, a: -k * ((a - mu(s)) ** 2).sum(-1)


def bimodal_q(k):  # a bandit's Q (one state) with two equal maxima, a = -0.6 and a = +0.6
    return lambda s, a: -k * torch.minimum((a - 0.6) ** 2, (a + 0.6) ** 2).sum(-1)


def sampled_actions_vs_argmax(den, sched, s) -> tuple[float, float, float]:
    """The acting sampler (T reverse steps, injected noise, clipped) at states s: mean distance of its actions to
    argmax Q, the same for uniform random actions, and the share of coordinates at ±1."""
    a = qsm.ddpm_sample(den, sched, s, 2)
    dist_uniform = (torch.rand_like(a) * 2 - 1 - mu(s)).norm(dim=-1).mean().item()
    return (a - mu(s)).norm(dim=-1).mean().item(), dist_uniform, (a.abs() >= 1).float().mean().item()


def same_target_at_every_scale(den, q_at, sched, batch, args) -> bool:
    """The default target M_q·∇ₐQ/RMS(∇ₐQ) does not depend on Q's scale: the loss on one batch (same draws) is the
    same at every k in SCALES, so a denoiser trained at one scale is the one trained at any of them."""
    losses = []
    for k in SCALES:
        torch.manual_seed(0)
        losses.append(qsm.qsm_loss(den, AnalyticQ(q_at(k)), sched, batch, args)[0].item())
    return losses == pytest.approx([losses[0]] * len(SCALES), rel=1e-5)


def test_sampled_actions_land_near_argmax_q_at_every_critic_scale():
    den, untrained, sched, args = train_qsm(quadratic_q(3.0), 4, 2, steps=1500)  # Gym MuJoCo's scale
    torch.manual_seed(123)  # fresh points, through the loss' own forward process
    s, a0 = torch.randn(2048, 4), torch.rand(2048, 2) * 2 - 1
    assert same_target_at_every_scale(den, quadratic_q, sched, {"obs": s, "actions": a0}, args)
    _, diag = qsm.qsm_loss(den, AnalyticQ(quadratic_q(3.0)), sched, {"obs": s, "actions": a0}, args)
    assert diag["qsm/score_alignment"] >= MIN_ALIGNMENT, diag["qsm/score_alignment"]

    dist, dist_uniform, at_bounds = sampled_actions_vs_argmax(den, sched, s)
    assert dist <= dist_uniform * MAX_DISTANCE, (dist, dist_uniform)
    assert at_bounds < MAX_AT_BOUNDS, at_bounds
    assert (qsm.ddpm_sample(untrained, sched, s, 2) - mu(s)).norm(dim=-1).mean().item() > dist_uniform / 2  # it learned


def test_the_papers_target_saturates_the_sampler_at_mujoco_scale():
    # what the default's tests guard against: ρ = 1 and M_q = 5 at T = 5 (our former Gym MuJoCo default) at k = 3
    den, _, sched, _ = train_qsm(quadratic_q(3.0), 4, 2, steps=700, normalize_q_grad=False, q_grad_scale=5.0,
                                 diffusion_steps=5)
    torch.manual_seed(123)
    dist, dist_uniform, at_bounds = sampled_actions_vs_argmax(den, sched, torch.randn(2048, 4))
    assert at_bounds > 0.5 and dist > dist_uniform, (at_bounds, dist, dist_uniform)


def test_two_equal_optima_give_a_bimodal_policy_at_every_critic_scale():
    # the paper's multimodality claim: two equal maxima of Q give two modes of the policy
    den, _, sched, args = train_qsm(bimodal_q(3.0), 1, 1, steps=1000, sample_states=lambda n: torch.zeros(n, 1))
    assert same_target_at_every_scale(den, bimodal_q, sched, {"obs": torch.zeros(256, 1), "actions": torch.rand(256, 1) * 2 - 1},
                                      args)
    torch.manual_seed(7)
    a = qsm.ddpm_sample(den, sched, torch.zeros(4000, 1), 1)[:, 0]
    assert share_near(a, 0.6) >= MIN_MODE and share_near(a, -0.6) >= MIN_MODE, (share_near(a, 0.6), share_near(a, -0.6))
    assert share_near(a, 0.0) < MAX_VALLEY  # two modes, not one wide bump: the valley between them stays nearly empty
    assert (a.abs() >= 1).float().mean().item() < MAX_AT_BOUNDS


def test_qsm_target_does_not_depend_on_the_scale_of_q():
    # the normalized target M_q·∇ₐQ/RMS(∇ₐQ) is the same for Q and 1000·Q; the paper's (--no-normalize-q-grad) is not
    q_fn = lambda s, a: quadratic_q(1.0)(s, a) + (s * a.sum(-1, keepdim=True)).sum(-1)
    den, sched = qsm.Denoiser(4, 2, (32, 32), 8), qsm.Schedule(5, torch.device("cpu"))
    batch = {"obs": torch.randn(64, 4), "actions": torch.rand(64, 2) * 2 - 1}

    def loss(scale, **kw):
        torch.manual_seed(0)
        return qsm.qsm_loss(den, AnalyticQ(lambda s, a: scale * q_fn(s, a)), sched, batch, qsm.Args(**kw))[0].item()

    assert loss(1.0) == pytest.approx(loss(1000.0), rel=1e-5)
    assert loss(1000.0, normalize_q_grad=False) > 100 * loss(1.0, normalize_q_grad=False)


# --- no gradient leaks ---------------------------------------------------------------------------------------
def test_losses_touch_only_their_own_network():
    torch.manual_seed(0)
    S, A = 5, 2
    args = qsm.Args()
    sched = qsm.Schedule(5, torch.device("cpu"))
    den, qf, qf_t = qsm.Denoiser(S, A, (16,), 8), qsm.TwinQ(S, A, (16,)), qsm.TwinQ(S, A, (16,))
    batch = {"obs": torch.randn(8, S), "next_obs": torch.randn(8, S), "actions": torch.rand(8, A) * 2 - 1,
             "rewards": torch.randn(8), "terminated": torch.zeros(8)}
    grads = lambda m: [p.grad for p in m.parameters()]

    loss, _ = qsm.qsm_loss(den, qf, sched, batch, args)
    loss.backward()
    assert all(g is None for g in grads(qf) + grads(qf_t))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(den))

    den.zero_grad(set_to_none=True)
    loss, _ = qsm.critic_loss(qf, qf_t, den, sched, batch, args)
    loss.backward()
    assert all(g is None for g in grads(den) + grads(qf_t))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(qf))


def test_critic_target_cuts_bootstrap_only_on_terminated():
    torch.manual_seed(0)
    args = qsm.Args(gamma=0.9)
    sched = qsm.Schedule(5, torch.device("cpu"))
    den = qsm.Denoiser(3, 1, (8,), 8)
    const_q = lambda c: AnalyticQ(lambda s, a: torch.full((s.shape[0],), c))
    batch = {"obs": torch.zeros(2, 3), "next_obs": torch.zeros(2, 3), "actions": torch.zeros(2, 1),
             "rewards": torch.tensor([1.0, 1.0]), "terminated": torch.tensor([0.0, 1.0])}
    # with Q ≡ 0 and Q̄ ≡ 10: y = 1 + 0.9·10 = 10 when not terminated, 1 when terminated → losses 100 and 1
    loss, info = qsm.critic_loss(const_q(0.0), const_q(10.0), den, sched, batch, args)
    assert info["losses/qf1_loss"].item() == pytest.approx((10.0**2 + 1.0**2) / 2)


def test_pessimism_moves_the_target_from_the_min_to_the_mean_of_the_twin_critics():
    sched, den = qsm.Schedule(5, torch.device("cpu")), qsm.Denoiser(3, 1, (8,), 8)
    twin = lambda c1, c2: lambda s, a: torch.stack([torch.full((s.shape[0],), c1), torch.full((s.shape[0],), c2)])
    batch = {"obs": torch.zeros(2, 3), "next_obs": torch.zeros(2, 3), "actions": torch.zeros(2, 1),
             "rewards": torch.zeros(2), "terminated": torch.zeros(2)}
    for beta, v in ((1.0, 6.0), (0.5, 7.0), (0.0, 8.0)):  # Q̄₁ ≡ 6, Q̄₂ ≡ 10: min 6, mean 8; Q ≡ 0, so loss = (γ·v)²
        _, info = qsm.critic_loss(twin(0.0, 0.0), twin(6.0, 10.0), den, sched, batch, qsm.Args(gamma=1.0, pessimism=beta))
        assert info["losses/qf2_loss"].item() == v**2


# --- the compiled update is the eager update, and as deterministic -----------------------------------------------
def test_compiled_update_matches_eager_and_repeats_bit_for_bit(monkeypatch):
    """One of the two tests that compile in this process (the others run eager: a cold compile of the update costs
    about a minute)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled code draws torch's own RNG
    # scalar C++ kernels: the same graphs without SIMD, and a cold compile about 30% shorter
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)
    S, A, B = 3, 1, 32
    g = torch.Generator().manual_seed(5)
    batch = {"obs": torch.randn(B, S, generator=g), "next_obs": torch.randn(B, S, generator=g),
             "actions": torch.rand(B, A, generator=g) * 2 - 1, "rewards": torch.randn(B, generator=g),
             "terminated": (torch.rand(B, generator=g) < 0.2).float()}
    runs = []
    for compile in (False, True, True):
        args = qsm.Args(compile=compile, actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32))
        torch.manual_seed(0)
        sched = qsm.Schedule(args.diffusion_steps, torch.device("cpu"))
        den = qsm.Denoiser(S, A, (32, 32), 64)
        qf, qf_t = (qsm.TwinQ(S, A, (32, 32), norm=args.critic_norm) for _ in range(2))  # the default critic
        qf_t.load_state_dict(qf.state_dict())
        q_opt = torch.optim.Adam(qf.parameters(), lr=1e-3, fused=True)
        a_opt = torch.optim.Adam(den.parameters(), lr=1e-3, fused=True)
        update = qsm.make_update(den, qf, qf_t, q_opt, a_opt, sched, args)
        flat_params = lambda: torch.cat([p.detach().flatten() for m in (den, qf, qf_t) for p in m.parameters()])
        p_init = flat_params()
        torch.manual_seed(1)
        metrics = [update(batch) for _ in range(3)]
        runs.append((metrics, flat_params()))
    (m_eager, p_eager), (m_comp, p_comp), (m_again, p_again) = runs
    assert torch.equal(p_comp, p_again) and all(torch.equal(m_comp[-1][k], m_again[-1][k]) for k in m_comp[-1])
    for me, mc in zip(m_eager, m_comp):
        for k in me:
            assert torch.allclose(me[k], mc[k], rtol=1e-4, atol=1e-5), (k, me[k], mc[k])
    assert torch.allclose(p_eager, p_comp, rtol=1e-4, atol=1e-5), (p_eager - p_comp).abs().max()
    assert (p_eager - p_init).abs().max() > 1e-3  # the three updates did move the parameters


# --- environment handling ---------------------------------------------------------------------------------------
def test_vector_env_autoreset_truncation_and_action_bounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(env_id="QsmProbe-v0", num_envs=2, total_timesteps=400, learning_starts=200))
    rb = out["rb"]
    n = rb.size
    obs, nxt, act, term = rb.obs[:n], rb.next_obs[:n], rb.actions[:n], rb.terminated[:n]
    assert n == 400  # every env step is a transition: the budget counts transitions (no autoreset step in it)
    # s' of an ended episode is its final obs, not the next reset: every transition advances the counter by one
    assert np.all(nxt[:, 0] == obs[:, 0] + 1)
    # terminated is stored exactly when the env terminated; truncations (counter 5, not terminated) are kept
    # with terminated = 0, so their targets bootstrap
    np.testing.assert_array_equal(term, nxt[:, 1])
    truncated = (nxt[:, 0] == 5) & (nxt[:, 1] == 0)
    assert truncated.sum() > 10 and term.sum() > 10
    # actions: the policy's [-1, 1] maps linearly onto low=[0, -1], high=[2, 5], random and learned phases alike
    low, high = ProbeEnv.action_space.low, ProbeEnv.action_space.high
    np.testing.assert_allclose(nxt[:, 2:], low + (act + 1) / 2 * (high - low), atol=1e-5)
    assert np.all(nxt[:, 2:] >= low) and np.all(nxt[:, 2:] <= high)
    assert np.abs(act).max() <= 1 and out["num_updates"] == 400  # --utd-ratio 2 per env step after learning_starts


# --- end to end ---------------------------------------------------------------------------------------------
def test_main_logs_saves_and_reloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(total_timesteps=500, learning_starts=100, eval_freq=250, eval_episodes=1))
    assert out["num_updates"] == 800  # two per env step after learning_starts (--utd-ratio 2)
    ea = EventAccumulator(out["run_dir"]).Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_loss", "losses/qf2_loss",
                "losses/qf1_values", "losses/actor_loss", "qsm/score_alignment", "qsm/dq_da_norm", "qsm/eps_norm",
                "eval/episodic_return", "policy/action_at_bounds", "policy/next_action_at_bounds", "policy/beats_random"}
    assert expected <= tags, expected - tags
    assert len(ea.Scalars("eval/episodic_return")) == 2
    assert all(np.isfinite(e.value) for e in ea.Scalars("losses/actor_loss"))

    ckpt = f"{out['run_dir']}/checkpoint.pt"  # saved at the end, whatever --checkpoint-freq (0 here)
    sd = torch.load(ckpt, weights_only=True)
    assert sd["global_step"] == 500 and torch.equal(sd["denoiser"]["net.0.weight"], out["denoiser"].state_dict()["net.0.weight"])
    assert f"evaluate its policy with: python qsm.py --env-id Pendulum-v1 --eval-only {ckpt}" in capsys.readouterr().err
    # architecture flags come from the checkpoint, so the defaults (256 wide) must not matter here
    ev = qsm.main(qsm.Args(env_id="Pendulum-v1", eval_only=ckpt, eval_episodes=2, cuda=False, compile=False))
    assert len(ev["eval_returns"]) == 2 and all(-2000 < r <= 0 for r in ev["eval_returns"])
    assert "eval Pendulum-v1: return" in capsys.readouterr().out
    # bad files: --resume of the networks alone, a truncated or empty file, a file of another program
    torch.save({k: sd[k] for k in ("args", "dims", "denoiser", "qf")}, "nets.pt")
    Path("cut.pt").write_bytes(Path(ckpt).read_bytes()[:1000])
    Path("empty.pt").write_bytes(b"")
    torch.save({"policy": {"w": torch.zeros(3)}}, "foreign.pt")
    for path, message in (("nets.pt", "nets.pt does not fit this qsm.py: it has no envs, global_step, num_updates, "
                                      "obs, rb, recent_returns, run_name"),
                          ("cut.pt", "cannot read checkpoint 'cut.pt': RuntimeError"),
                          ("empty.pt", "cannot read checkpoint 'empty.pt': EOFError"),
                          ("foreign.pt", "foreign.pt is not a checkpoint of this qsm.py")):
        with pytest.raises(SystemExit) as e:
            qsm.main(qsm.Args(resume=path))
        assert str(e.value.code).startswith("qsm.py: error: ") and message in str(e.value.code), e.value.code


def test_checkpoint_of_another_env_is_refused_in_one_line(tmp_path, monkeypatch):
    """Forgetting --env-id (so Walker2d-v4 is assumed) or naming another env: say what the checkpoint was made for."""
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(total_timesteps=150, learning_starts=100))
    for env_id, dims in (("Walker2d-v4", "obs 17, act 6"), ("Hopper-v4", "obs 11, act 3")):
        with pytest.raises(SystemExit) as e:
            qsm.main(qsm.Args(env_id=env_id, eval_only=f"{out['run_dir']}/checkpoint.pt", cuda=False, compile=False))
        assert str(e.value.code) == (f"qsm.py: error: {out['run_dir']}/checkpoint.pt was made for Pendulum-v1 (obs 3, act 1), "
                                     f"not {env_id} ({dims}); pass --env-id Pendulum-v1")
    assert len(glob.glob("runs/*")) == 1  # nothing was made for the refused runs


# --- bad input: one line `qsm.py: error: …`, exit status 1, before any run folder is made ---------------------------
gym.register("QsmVectorReward-v0", entry_point=lambda: gym.wrappers.TransformReward(ProbeEnv(), lambda r: np.array([r])),
             max_episode_steps=5)
gym.register("Qsm2DAction-v0", entry_point=lambda: BadEnv(gym.spaces.Box(-1, 1, (3,)), gym.spaces.Box(-1, 1, (2, 2))))


@pytest.mark.parametrize("kw, message", [
    (dict(env_id="CartPole-v1"), "CartPole-v1 has the action space Discrete(2); QSM needs a continuous 1-D Box"),
    (dict(env_id="QsmUnboundedAction-v0"), "unbounded action space"),
    (dict(env_id="Qsm2DAction-v0"), "needs a continuous 1-D Box action space"),
    (dict(env_id="QsmImageObs-v0"), "flat (1-D) Box observation"),
    (dict(env_id="NoSuchEnv-v0"), "cannot make environment 'NoSuchEnv-v0'"),
    (dict(env_id="Walker2d-v2"), "cannot make environment 'Walker2d-v2': ImportError: The mujoco v2 and v3"),
    (dict(seed=-1), "--seed must be in [0, 2^31)"),
    (dict(batch_size=512, buffer_size=256), "larger than --buffer-size"),
    (dict(learning_starts=300, total_timesteps=300), "no update would run"),
    (dict(actor_lr=-3e-4), "learning rates must be > 0"),
    (dict(critic_lr=0.0), "learning rates must be > 0"),
    (dict(actor_lr_decay_steps=-1), "--actor-lr-decay-steps must be ≥ 0"),
    (dict(actor_hidden_dims=()), "need at least one width"),
    (dict(q_grad_scale=0.0), "--q-grad-scale must be > 0"),
    (dict(diffusion_steps=0), "--num-envs, --batch-size, --utd-ratio and --diffusion-steps must be ≥ 1"),
    (dict(eval_freq=100, eval_episodes=0), "--eval-episodes must be ≥ 1 when evaluating"),
    (dict(eval_freq=-1), "--eval-freq and --checkpoint-freq must be ≥ 0"),
    (dict(checkpoint_freq=-1), "--eval-freq and --checkpoint-freq must be ≥ 0"),
    (dict(log_freq=0), "--log-freq ≥ 1"),
    (dict(resume="nowhere.pt"), "cannot read checkpoint 'nowhere.pt'"),
    (dict(buffer_size=10**12, total_timesteps=10**12), "needs 33527.6 GiB, more than this machine has"),
    (dict(diffusion_steps=10**8), "--diffusion-steps must be ≤ 1000"),
    (dict(critic_hidden_dims=(10**6, 10**6)), "GiB with their optimizer states, more than a quarter"),
    (dict(num_envs=3, total_timesteps=1001), "--total-timesteps 1001 is not a multiple of --num-envs 3"),
    (dict(env_id="QsmVectorReward-v0"), "step() returned a reward of shape (1,); a scalar is needed"),
])
def test_bad_input_fails_before_training(kw, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(**kw))
    msg = str(e.value.code)
    assert message in msg and msg.startswith("qsm.py: error:") and "\n" not in msg, msg
    assert not (tmp_path / "runs").exists()


def test_track_without_wandb_fails_at_start(tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--track needs wandb: pip install wandb"):
        qsm.main(small_args(track=True))
    assert not (tmp_path / "runs").exists()


def test_unwritable_run_folder_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("runs").write_text("a file where the runs folder should go")  # as a read-only directory would, mkdir fails
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args())
    assert str(e.value.code).startswith(f"qsm.py: error: cannot make a run folder in {tmp_path}/runs: FileExistsError")


def stderr_lines(stderr: str) -> list[str]:
    return [l for l in stderr.strip().splitlines() if "Warn" not in l and "logger." not in l]  # gymnasium's warnings


def test_cli_bad_input_is_one_line(tmp_path, monkeypatch):
    p = subprocess.run([sys.executable, str(HERE / "qsm.py"), "--env-id", "CartPole-v1"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)  # the command line itself, once
    assert p.returncode == 1 and stderr_lines(p.stderr) == [stderr_lines(p.stderr)[-1]], p.stderr
    assert stderr_lines(p.stderr)[0].startswith("qsm.py: error: CartPole-v1 has the action space Discrete(2)")
    monkeypatch.chdir(tmp_path)
    for flags, message in ((["--actor-hidden-dims"], "--actor-hidden-dims and --critic-hidden-dims need at least one"),
                           (["--seed", "-1"], "--seed must be in [0, 2^31)")):  # tyro's parse, in this process
        with pytest.raises(SystemExit) as e:
            qsm.main(tyro.cli(qsm.Args, args=flags))
        assert str(e.value.code).startswith(f"qsm.py: error: {message}"), e.value.code
    assert not (tmp_path / "runs").exists()


# --- learning ----------------------------------------------------------------------------------------------------
def test_learns_pendulum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = qsm.Args(env_id="Pendulum-v1", seed=1, total_timesteps=3000, learning_starts=1000, actor_hidden_dims=(64, 64),
                    critic_hidden_dims=(64, 64), eval_freq=0, eval_episodes=10, cuda=False,
                    compile=False)  # eager: the compiled update is the same (test_compiled_update_matches_eager_…)
    out = qsm.main(args)
    cpu = torch.device("cpu")
    returns = qsm.evaluate(out["denoiser"], qsm.Schedule(args.diffusion_steps, cpu), args, cpu, qsm.Stop())
    # after 4000 updates (two per step) the policy swings the pendulum up and holds it: -157 to -197 on seeds 1-5
    # (random ≈ -1200); 1000 steps fewer, the moving moments of --obs-norm still cost it (benchmarks/README.md, item 8)
    assert len(returns) == 10 and np.mean(returns) >= -500, returns


# --- long runs: reproducibility, checkpoints and resume, NaN guard, signals -------------------------------------
def flat_params(*nets) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for net in nets for p in net.state_dict().values()])


def scalars(run_dir, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload().Scalars(tag)]


def keep_checkpoint_at(step: int, dest, monkeypatch):  # dest: a file name in the run folder
    """Also write the checkpoint of `step` to dest in the run folder, as if the run had crashed just after saving it."""
    save = qsm.save_checkpoint

    def spy(path, state):
        save(path, state)
        if state["global_step"] == step:
            save(os.path.join(os.path.dirname(path), dest), state)

    monkeypatch.setattr(qsm, "save_checkpoint", spy)


def test_same_seed_same_run_other_seed_differs(tmp_path, monkeypatch):
    """The second run takes --compile's path with torch.compile as the identity: its warm-up (one update and one
    sample before training) must put every state back, so that it is the same run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)
    runs = [qsm.main(small_args(seed=s, total_timesteps=500, learning_starts=200, compile=c)) for s, c in
            ((1, False), (1, True), (2, False))]
    returns = [scalars(r["run_dir"], "charts/episodic_return") for r in runs]
    params = [flat_params(r["denoiser"], r["qf"]) for r in runs]
    assert runs[0]["num_updates"] == 600 and len(returns[0]) == 2
    assert returns[0] == returns[1] and torch.equal(params[0], params[1])  # bit for bit
    assert returns[0] != returns[2] and not torch.allclose(params[0], params[2])


def test_resume_continues_the_run_exactly(tmp_path, monkeypatch, capsys):
    """Straight 500 steps vs the checkpoint at 300 resumed (inside Pendulum's second 200-step episode): Pendulum
    pickles with its state, so the resumed run is the same run: same parameters bit for bit, one TensorBoard curve
    without overlap."""
    monkeypatch.chdir(tmp_path)
    keep_checkpoint_at(300, "at300.pt", monkeypatch)
    straight = qsm.main(small_args(total_timesteps=500, learning_starts=100, checkpoint_freq=150))
    before = {tag: scalars(straight["run_dir"], tag) for tag in ("charts/episodic_return", "losses/actor_loss")}
    ck = torch.load(f"{straight['run_dir']}/at300.pt", weights_only=True)
    assert ck["envs"] is not None and (ck["global_step"], ck["num_updates"]) == (300, 400)
    assert ck["rb"]["size"] == 300  # one transition per step, the end of Pendulum's first episode included

    resumed = qsm.main(qsm.Args(resume=f"{straight['run_dir']}/at300.pt", total_timesteps=5))  # flags from the checkpoint
    assert "ignoring total_timesteps" in capsys.readouterr().err
    assert resumed["run_dir"] == straight["run_dir"] and resumed["num_updates"] == 800
    assert torch.equal(flat_params(resumed["denoiser"], resumed["qf"]), flat_params(straight["denoiser"], straight["qf"]))
    for tag, curve in before.items():  # the steps after 300 were logged twice; the resumed writer purged the first
        assert scalars(straight["run_dir"], tag) == curve, tag
    assert [s for s, _ in before["losses/actor_loss"]] == list(range(150, 501, 50))


def test_resume_mujoco_starts_new_episodes(tmp_path, monkeypatch):
    """MuJoCo envs do not pickle with their state: all else is restored exactly, and the envs start new episodes."""
    monkeypatch.chdir(tmp_path)
    keep_checkpoint_at(200, "at200.pt", monkeypatch)
    straight = qsm.main(small_args(env_id="Hopper-v4", total_timesteps=400, learning_starts=100, checkpoint_freq=200))
    ck = torch.load(f"{straight['run_dir']}/at200.pt", weights_only=True)
    assert ck["envs"] is None and ck["global_step"] == 200
    resumed = qsm.main(qsm.Args(resume=f"{straight['run_dir']}/at200.pt"))
    assert resumed["global_step"] == 400 and resumed["num_updates"] == straight["num_updates"] == 600
    a, b, n = straight["rb"], resumed["rb"], ck["rb"]["size"]
    assert np.array_equal(a.obs[:n], b.obs[:n]) and np.array_equal(a.actions[:n], b.actions[:n])
    reset_obs = gym.make("Hopper-v4").reset(seed=1 + 200)[0].astype(np.float32)  # seed + step
    np.testing.assert_array_equal(b.obs[n], reset_obs)  # the first transition after the resume starts an episode
    assert not np.array_equal(a.obs[n], b.obs[n])


class BrokenEnv(ProbeEnv):
    """The probe env, which breaks after `broken_after` steps (a bug in a user's env): its reward turns NaN, its
    observation infinite, or too large for float32 (1e39, finite in float64), or step raises. Class attributes, so
    that a test can repair the env before resuming (they are not pickled)."""

    broken_after, field = 250, "reward"

    def __init__(self):
        self.total = 0

    def step(self, action):
        self.total += 1
        obs, r, terminated, truncated, info = super().step(action)
        if self.total > self.broken_after:
            if self.field == "raise":
                raise RuntimeError("the simulator is unstable")
            r = float("nan") if self.field == "reward" else r
            obs = obs + np.array([0, 0, {"observation": np.inf, "overflow": 1e39}.get(self.field, 0), 0])
        return obs, r, terminated, truncated, info


gym.register("QsmBroken-v0", entry_point=BrokenEnv, max_episode_steps=5)


@pytest.mark.parametrize("field", ["reward", "observation", "overflow", "raise"])
def test_broken_env_stops_in_one_line_before_the_replay_buffer(field, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(BrokenEnv, "field", field)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(env_id="QsmBroken-v0", total_timesteps=400, learning_starts=100, checkpoint_freq=200))
    path = glob.glob("runs/*/checkpoint.pt")[0]
    what = {"reward": "reward", "raise": None}.get(field, "observation")
    assert str(e.value.code) == (f"qsm.py: error: non-finite {what} from QsmBroken-v0 at step 251; it was not "
                                 f"stored; last good checkpoint: {path}" if what else "qsm.py: error: RuntimeError: "
                                 f"the simulator is unstable at step 250; last good checkpoint: {path} (QSM_DEBUG=1 "
                                 f"shows the traceback)")
    ck = torch.load(path, weights_only=True)
    assert ck["global_step"] == 200 and all(torch.isfinite(ck["rb"][k]).all() for k in qsm.ReplayBuffer.FIELDS)
    monkeypatch.setattr(BrokenEnv, "broken_after", 10**9)  # the env repaired: the good checkpoint resumes to the end
    out = qsm.main(qsm.Args(resume=path))
    assert out["global_step"] == 400 and out["num_updates"] == 600 and np.isfinite(out["rb"].rewards).all()


def test_a_broken_env_in_evaluation_and_a_full_disk_are_one_line_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = qsm.main(small_args(env_id="QsmBroken-v0", total_timesteps=200))["run_dir"]
    monkeypatch.setattr(BrokenEnv, "broken_after", 3)  # evaluation's env breaks at its 4th step
    with pytest.raises(SystemExit) as e:
        qsm.main(qsm.Args(env_id="QsmBroken-v0", eval_only=f"{run_dir}/checkpoint.pt", compile=False))
    assert str(e.value.code) == ("qsm.py: error: non-finite reward from QsmBroken-v0 in evaluation episode 1 at step "
                                 "its end; it was not stored; last good checkpoint: unchanged")

    def full(self, *args, **kwargs):  # TensorBoard's writes hit a full disk after the first checkpoint
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qsm.SummaryWriter, "add_scalar", full)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(total_timesteps=300, log_freq=250, checkpoint_freq=100))
    path = glob.glob("runs/Pendulum*/checkpoint.pt")[0]  # the episode's end at step 200 is the first scalar logged
    assert str(e.value.code) == (f"qsm.py: error: OSError: [Errno 28] No space left on device at step 200; last good "
                                 f"checkpoint: {path} (QSM_DEBUG=1 shows the traceback)")


class HugeResetEnv(ProbeEnv):
    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return obs + 1e39, info  # finite in float64, Inf in float32


gym.register("QsmHugeReset-v0", entry_point=HugeResetEnv, max_episode_steps=5)


def test_the_first_reset_observation_is_checked_as_float32(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(env_id="QsmHugeReset-v0"))
    assert str(e.value.code) == ("qsm.py: error: non-finite reset observation from QsmHugeReset-v0 at step 0; it was "
                                 "not stored; last good checkpoint: none yet")


def test_one_process_per_run_and_resume_writes_to_the_checkpoints_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = qsm.main(small_args(total_timesteps=300, checkpoint_freq=200))["run_dir"]
    ckpt = str(tmp_path / run_dir / "checkpoint.pt")
    lock = qsm.lock_run_dir(run_dir)  # as a process running the run would hold it
    with pytest.raises(SystemExit) as e:
        qsm.main(qsm.Args(resume=ckpt))
    assert str(e.value.code) == (f"qsm.py: error: another process is running the run in {tmp_path / run_dir}; wait "
                                 f"for it to end or stop it first")
    lock.close()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # resumed from another folder: the run continues where it lives
    out = qsm.main(qsm.Args(resume=ckpt))
    assert out["run_dir"] == str(tmp_path / run_dir) and out["global_step"] == 300
    assert os.listdir(tmp_path / "elsewhere") == [] and len(glob.glob(str(tmp_path / run_dir / "events.*"))) == 2


def test_a_checkpoint_of_another_qsm_version_says_what_differs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = qsm.main(small_args(total_timesteps=300, checkpoint_freq=200))["run_dir"]
    good = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)
    w = "hidden.0.weight"
    variants = [  # (how the other version's checkpoint differs, what the one line says)
        (lambda c: c["qf"].pop(w), f'qf: RuntimeError: Error(s) in loading state_dict for TwinQ: Missing key(s) in state_dict: "{w}"'),
        (lambda c: c["qf"].update(extra=torch.zeros(1)), 'Unexpected key(s) in state_dict: "extra"'),
        (lambda c: c["qf"].update({w: torch.zeros(2, 5, 64)}), f"size mismatch for {w}: copying a param with shape "
         "torch.Size([2, 5, 64]) from checkpoint, the shape in current model is torch.Size([2, 4, 32])"),
        (lambda c: c.pop("rng"), "it has no 'rng'"),
        (lambda c: c.pop("num_updates"), "it has no num_updates"),
        (lambda c: c["args"].update(actor_tau=0.05), "it has flags unknown here: actor_tau"),
        (lambda c: c["q_opt"]["param_groups"].clear(), "q_opt: ValueError"),
    ]
    for change, message in variants:
        bad = copy.deepcopy(good)
        change(bad)
        torch.save(bad, "other.pt")
        with pytest.raises(SystemExit) as e:
            qsm.main(qsm.Args(resume="other.pt"))
        assert str(e.value.code).startswith("qsm.py: error: other.pt does not fit this qsm.py: ") and message in str(
            e.value.code) and "\n" not in str(e.value.code), (message, e.value.code)


@pytest.mark.parametrize("kw, message", [  # the first update after learning_starts sends a network to NaN:
    (dict(actor_lr=1e30, utd_ratio=1), "non-finite action from the policy at step 202;"),  # before the env gets it
    (dict(actor_lr=1e30), "non-finite losses/qf1_loss = nan"),  # UTD 2: the second update's a' is already NaN
    (dict(critic_lr=1e30), "non-finite losses/actor_loss = nan"),  # its ∇ₐQ: stopped in the same update
])
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(kw, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(**kw, total_timesteps=2000, learning_starts=200, checkpoint_freq=200))
    msg = str(e.value.code)
    assert msg.startswith(f"qsm.py: error: {message}"), msg
    step = int(re.search(r"at step (\d+)", msg).group(1))
    path = msg.split("last good checkpoint: ")[1].split()[0]
    ck = torch.load(path, weights_only=True)
    assert step < 2000 and ck["global_step"] == (step - 1) // 200 * 200 and ck["global_step"] >= 200
    assert all(torch.isfinite(p).all() for net in ("denoiser", "qf") for p in ck[net].values())
    assert not glob.glob("runs/*/*.tmp")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_save, calls = torch.save, []

    def full_disk(obj, path):  # the second checkpoint hits a full disk after writing part of the file
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(total_timesteps=600, learning_starts=100, checkpoint_freq=200))
    path = glob.glob("runs/*/checkpoint.pt")[0]
    assert str(e.value.code) == (f"qsm.py: error: cannot write {path}: RuntimeError: [enforce fail at "
                                 f"inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file "
                                 f"write failed; the previous checkpoint, if any, is unchanged")
    assert not glob.glob("runs/*/*.tmp") and torch.load(path, weights_only=True)["global_step"] == 200


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """A sweep launcher starts two runs of one env and seed at once: neither may overwrite the other."""
    monkeypatch.chdir(tmp_path)
    clock = iter(np.arange(1_700_000_000, 1_700_000_001, 1e-6))  # a clock that stays within one second
    monkeypatch.setattr(qsm.time, "time", lambda: next(clock))
    runs = [qsm.main(small_args(total_timesteps=150, learning_starts=100, checkpoint_freq=150, seed=1))
            for _ in range(2)]
    assert [r["run_dir"] for r in runs] == ["runs/Pendulum-v1__qsm__1__1700000000",
                                            "runs/Pendulum-v1__qsm__1__1700000000_2"]
    for r in runs:  # each folder: one TensorBoard file and its own checkpoint
        assert len(glob.glob(f"{r['run_dir']}/events.*")) == 1
        assert torch.load(f"{r['run_dir']}/checkpoint.pt", weights_only=True)["run_name"] == r["run_dir"][5:]
    names = set()  # and concurrently: of 8 threads asking for one name, each gets its own folder
    threads = [threading.Thread(target=lambda: names.add(qsm.make_run_dir("same"))) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(names) == 8 and len(glob.glob("runs/same*")) == 8


class EndlessEnv(gym.Env):
    """An env whose episodes never end (no time limit registered)."""

    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self):
        pass

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.clip(np.array([action[0], 0.5], np.float32), -1, 1), -float(action[0] ** 2), False, False, {}


gym.register("QsmEndless-v0", entry_point=EndlessEnv)


def test_env_without_time_limit_trains_and_evaluates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(env_id="QsmEndless-v0", total_timesteps=1100, learning_starts=1000, eval_freq=1100,
                              eval_episodes=1))
    assert scalars(out["run_dir"], "charts/episodic_length") == [(1000, qsm.TIME_LIMIT)]  # truncated at TIME_LIMIT
    (step, ret), = scalars(out["run_dir"], "eval/episodic_return")
    assert step == 1100 and -qsm.TIME_LIMIT <= ret <= 0  # the evaluation episode ends too (reward ≥ -1 per step)
    assert out["rb"].terminated.sum() == 0  # truncation: the critic target bootstraps


SLOW_ENV = """
import time, gymnasium as gym, numpy as np

class SlowEndless(gym.Env):
    observation_space, action_space = gym.spaces.Box(-1, 1, (2,)), gym.spaces.Box(-1, 1, (1,))

    def reset(self, *, seed=None, options=None):
        if seed is not None and seed >= 10_000:  # evaluation episodes are seeded from seed + 10,000: say it began
            open("evaluating", "w").close()
        return np.zeros(2, np.float32), {}

    def step(self, action):
        time.sleep(0.002)
        return np.zeros(2, np.float32), 0.0, False, False, {}

gym.register("SlowEndless-v0", entry_point=SlowEndless)
"""


def start_run(tmp_path, *flags, compile=False) -> tuple[subprocess.Popen, list[str]]:
    """qsm.py in a subprocess, with a thread collecting its stderr as it comes."""
    cmd = [sys.executable, str(HERE / "qsm.py"), "--total-timesteps", "1000000", "--learning-starts", "10",
           "--batch-size", "32", "--actor-hidden-dims", "32", "32", "--critic-hidden-dims", "32", "32", "--no-cuda",
           "--log-freq", "10", "--compile" if compile else "--no-compile", *flags]
    (tmp_path / "slow_env.py").write_text(SLOW_ENV)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = []
    threading.Thread(target=lambda: err.extend(iter(lambda: p.stderr.read(64), "")), daemon=True).start()
    return p, err


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition(), "timed out"


def stop_and_time(p, sig) -> float:
    t = time.time()
    p.send_signal(sig)
    p.wait(timeout=60)
    return time.time() - t


def test_signal_saves_a_checkpoint_and_flushes_the_log(tmp_path):
    cases = [(signal.SIGINT, 10), (signal.SIGTERM, 10), (signal.SIGHUP, 10),  # stopped while updating,
             (signal.SIGTERM, 999_999)]  # and during the random steps
    runs = []
    for i, (_, learning_starts) in enumerate(cases):  # four runs at once, each in its own folder
        (tmp_path / str(i)).mkdir()
        runs.append(start_run(tmp_path / str(i), "--env-id", "Pendulum-v1", "--learning-starts", str(learning_starts)))
    for p, err in runs:
        wait_for(lambda: max(map(int, re.findall(r"(\d+)/1000000", "".join(err))), default=0) >= 60)  # tqdm's N/1000000
    t = time.time()
    for (p, _), (sig, _) in zip(runs, cases):  # all four stopped together
        p.send_signal(sig)
    for p, _ in runs:
        p.wait(timeout=60)
    assert time.time() - t < 10
    time.sleep(0.5)
    for i, ((p, err), (sig, learning_starts)) in enumerate(zip(runs, cases)):
        err = "".join(err)
        assert p.returncode == 128 + sig, err[-2000:]
        if sig != signal.SIGHUP:  # after SIGHUP (the terminal is gone) the run writes to /dev/null
            assert f"qsm.py: {sig.name}: saving a checkpoint at the end of this step, then exiting; a second" in err
            assert f"stopped by {sig.name} at step" in err
        run_dir = glob.glob(str(tmp_path / str(i) / "runs/*"))[0]
        ck = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)
        step = ck["global_step"]
        # mid-run, two updates per step after learning_starts, and the buffer holds every step
        assert step >= 60 and ck["num_updates"] == 2 * max(0, step - learning_starts) and ck["rb"]["size"] == step, step
        logged = [s for s, _ in scalars(run_dir, "charts/SPS")]
        assert logged[0] == 10 and step - 10 < logged[-1] <= step, (step, logged)  # the writer was flushed up to the stop


def test_signal_during_evaluation_stops_it_within_seconds(tmp_path):
    """Five 1000-step evaluation episodes of an env with no time limit take ≥ 10 s: a SIGTERM must not wait."""
    p, err = start_run(tmp_path, "--env-id", "slow_env:SlowEndless-v0", "--eval-freq", "50", "--eval-episodes", "5")
    wait_for(lambda: (tmp_path / "evaluating").exists())
    time.sleep(0.5)
    assert stop_and_time(p, signal.SIGTERM) < 5 and p.returncode == 128 + signal.SIGTERM, "".join(err)[-2000:]
    run_dir = glob.glob(str(tmp_path / "runs/*"))[0]
    ck = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)
    assert ck["global_step"] == 50 and ck["num_updates"] == 80  # saved at the step the evaluation began
    assert "eval/episodic_return" not in EventAccumulator(run_dir).Reload().Tags()["scalars"]  # a cut one: not logged


def test_signal_during_compile_warm_up_exits_within_seconds(tmp_path):
    p, err = start_run(tmp_path, "--env-id", "Pendulum-v1", compile=True)
    wait_for(lambda: "compiling" in "".join(err))
    time.sleep(2)  # inside inductor's compilation (≈20 s)
    assert stop_and_time(p, signal.SIGTERM) < 5, "".join(err)[-2000:]
    assert p.returncode == 128 + signal.SIGTERM
    assert "qsm.py: SIGTERM before training began: exiting, nothing to save" in "".join(err)
    assert not (tmp_path / "runs").exists()


def test_dm_control_task_end_to_end(tmp_path, monkeypatch):
    """DeepMind Control through shimmy: dict observations flattened, 1000-step episodes that end by truncation only
    (so every target bootstraps), updates, evaluation, checkpoint and resume."""
    monkeypatch.chdir(tmp_path)
    keep_checkpoint_at(1050, "at1050.pt", monkeypatch)
    out = qsm.main(small_args(env_id="dm_control/walker-walk-v0", total_timesteps=1100, learning_starts=1000,
                              eval_freq=1100, eval_episodes=1, checkpoint_freq=1050))
    rb = out["rb"]
    assert rb.obs.shape[1] == 24 and out["num_updates"] == 200 and rb.size == 1100
    assert rb.terminated.sum() == 0 and np.isfinite(rb.obs).all()  # truncation only: y = r + γ·min Q̄(s', a')
    assert out["run_dir"].startswith("runs/dm_control-walker-walk-v0__qsm__1__")  # the / in the id nests nothing
    assert scalars(out["run_dir"], "charts/episodic_length") == [(1000, 1000)]
    ret = scalars(out["run_dir"], "charts/episodic_return")[0][1]
    assert 0 <= ret <= 1000  # DeepMind Control's rewards are in [0, 1]
    (step, eval_ret), = scalars(out["run_dir"], "eval/episodic_return")
    assert step == 1100 and 0 <= eval_ret <= 1000
    resumed = qsm.main(qsm.Args(resume=f"{out['run_dir']}/at1050.pt"))
    assert resumed["global_step"] == 1100 and resumed["num_updates"] == 200 and resumed["run_dir"] == out["run_dir"]
