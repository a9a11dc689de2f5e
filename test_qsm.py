"""Tests of qsm.py: the algorithm's pieces, the environment handling, the whole loop, and learning on Pendulum."""
import copy
import glob
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
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import qsm

HERE = Path(__file__).parent


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
    base = dict(env_id="Pendulum-v1", total_timesteps=300, learning_starts=100, batch_size=32, buffer_size=10_000,
                actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), eval_freq=0, log_freq=50, cuda=False, compile=False)
    base.update(kw)
    return qsm.Args(**base)


# --- shapes and dtypes -----------------------------------------------------------------------------------------
def test_shapes_and_dtypes():
    torch.manual_seed(0)
    B, S, A, T = 7, 5, 3, 5
    sched = qsm.Schedule("vp", T, torch.device("cpu"))
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
    rb.add(obs, obs + 1, np.zeros((2, A), np.float32), np.ones(2), np.array([False, True]), keep=np.array([1, 1], bool))
    batch = rb.sample(4, np.random.default_rng(0))
    assert rb.size == 2 and rb.obs.dtype == np.float32
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {"obs": (4, S), "next_obs": (4, S), "actions": (4, A), "rewards": (4,), "terminated": (4,)}
    assert all(v.dtype == torch.float32 for v in batch.values())


def test_replay_buffer_wraps_around():
    rb = qsm.ReplayBuffer(3, 1, 1, torch.device("cpu"))
    for i in range(5):
        rb.add(np.array([[i]]), np.array([[i + 1]]), np.zeros((1, 1)), np.array([i]), np.array([False]), np.array([True]))
    assert rb.size == 3 and sorted(rb.rewards.tolist()) == [2.0, 3.0, 4.0]


# --- noise schedules -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vp", "cosine", "linear"])
@pytest.mark.parametrize("T", [1, 5, 50])
def test_schedules(name, T):
    sched = qsm.Schedule(name, T, torch.device("cpu"))
    assert sched.betas.shape == (T,)
    assert ((sched.betas > 0) & (sched.betas < 1)).all()
    assert (sched.alpha_bars[1:] < sched.alpha_bars[:-1]).all()
    assert torch.allclose(sched.alpha_bars, torch.cumprod(1 - sched.betas, 0))


def test_vp_schedule_matches_official_formula():
    # β_t = 1 - exp(-b_min/T - ½(b_max - b_min)(2t - 1)/T²), t = 1..T, b_min = 0.1, b_max = 10
    b = qsm.make_beta_schedule("vp", 5)
    expected = [1 - np.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25) for t in range(1, 6)]
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-6)


# --- the QSM loss against analytic critics -----------------------------------------------------------------------
class AnalyticQ(nn.Module):
    """Both 'critics' are the same fixed function q_fn(s, a); shaped (2, B) like qsm.TwinQ."""

    def __init__(self, q_fn):
        super().__init__()
        self.q_fn = q_fn

    def forward(self, s, a):
        return torch.stack([self.q_fn(s, a)] * 2)


def train_qsm(q_fn, obs_dim, act_dim, steps, seed=0, sample_states=None):
    torch.manual_seed(seed)
    args = qsm.Args()  # the defaults: M_q, T = 5, vp schedule
    sched = qsm.Schedule(args.beta_schedule, args.diffusion_steps, torch.device("cpu"))
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


def test_score_aligns_with_grad_q_and_samples_reach_the_optimum():
    # Q(s, a) = -c‖a - μ(s)‖² with c = 1/(2 M_q), so that the regression target -M_q·∇ₐQ = a - μ(s) is of order one
    W = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    mu = lambda s: 0.6 * torch.tanh(s @ W)
    c = 0.5 / qsm.Args().q_grad_scale
    q_fn = lambda s, a: -c * ((a - mu(s)) ** 2).sum(-1)
    den, untrained, sched, args = train_qsm(q_fn, 4, 2, steps=1500)

    torch.manual_seed(123)  # fresh points, through the loss' own forward process
    s, a0 = torch.randn(2048, 4), torch.rand(2048, 2) * 2 - 1
    _, diag = qsm.qsm_loss(den, AnalyticQ(q_fn), sched, {"obs": s, "actions": a0}, args)
    assert diag["qsm/score_alignment"] >= 0.99

    dist = lambda d: (qsm.ddpm_sample(d, sched, s, 2) - mu(s)).norm(dim=-1).mean().item()
    trained, before = dist(den), dist(untrained)
    assert trained < 0.5 * before, (trained, before)
    assert trained < 0.6  # what is left is the noise σ_1 z of the last stochastic step, ≈ 0.48 in 2-D


def test_two_equal_optima_give_a_bimodal_policy():
    # a bandit (one state) whose Q has two equal maxima, a = -0.6 and a = +0.6; c = 1/M_q: -M_q·∇ₐQ = 2(a - mode)
    c = 1.0 / qsm.Args().q_grad_scale
    q_fn = lambda s, a: -c * torch.minimum((a - 0.6) ** 2, (a + 0.6) ** 2).sum(-1)
    den, _, sched, _ = train_qsm(q_fn, 1, 1, steps=1500, sample_states=lambda n: torch.zeros(n, 1))
    torch.manual_seed(7)
    a = qsm.ddpm_sample(den, sched, torch.zeros(4000, 1), 1)[:, 0]
    frac_near = lambda x: ((a - x).abs() < 0.2).float().mean().item()
    assert frac_near(0.6) >= 0.25 and frac_near(-0.6) >= 0.25, (frac_near(0.6), frac_near(-0.6))
    assert frac_near(0.0) < 0.1  # two modes, not one wide bump: the valley between them stays nearly empty


# --- no gradient leaks ---------------------------------------------------------------------------------------
def test_losses_touch_only_their_own_network():
    torch.manual_seed(0)
    S, A = 5, 2
    args = qsm.Args()
    sched = qsm.Schedule("vp", 5, torch.device("cpu"))
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
    sched = qsm.Schedule("vp", 5, torch.device("cpu"))
    den = qsm.Denoiser(3, 1, (8,), 8)
    const_q = lambda c: AnalyticQ(lambda s, a: torch.full((s.shape[0],), c))
    batch = {"obs": torch.zeros(2, 3), "next_obs": torch.zeros(2, 3), "actions": torch.zeros(2, 1),
             "rewards": torch.tensor([1.0, 1.0]), "terminated": torch.tensor([0.0, 1.0])}
    # with Q ≡ 0 and Q̄ ≡ 10: y = 1 + 0.9·10 = 10 when not terminated, 1 when terminated → losses 100 and 1
    loss, info = qsm.critic_loss(const_q(0.0), const_q(10.0), den, sched, batch, args)
    assert info["losses/qf1_loss"].item() == pytest.approx((10.0**2 + 1.0**2) / 2)


# --- the compiled update is the eager update ---------------------------------------------------------------------
def test_compiled_update_matches_eager(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # compiled code draws torch's own RNG
    S, A, B = 17, 6, 64
    g = torch.Generator().manual_seed(5)
    batch = {"obs": torch.randn(B, S, generator=g), "next_obs": torch.randn(B, S, generator=g),
             "actions": torch.rand(B, A, generator=g) * 2 - 1, "rewards": torch.randn(B, generator=g),
             "terminated": (torch.rand(B, generator=g) < 0.2).float()}
    runs = []
    for compile in (False, True):
        args = qsm.Args(compile=compile, actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64))
        torch.manual_seed(0)
        sched = qsm.Schedule(args.beta_schedule, args.diffusion_steps, torch.device("cpu"))
        den, qf, qf_t = qsm.Denoiser(S, A, (64, 64), 64), qsm.TwinQ(S, A, (64, 64)), qsm.TwinQ(S, A, (64, 64))
        qf_t.load_state_dict(qf.state_dict())
        q_opt = torch.optim.Adam(qf.parameters(), lr=1e-3, fused=True)
        a_opt = torch.optim.Adam(den.parameters(), lr=1e-3, fused=True)
        update = qsm.make_update(den, den, qf, qf_t, q_opt, a_opt, sched, args)
        flat_params = lambda: torch.cat([p.detach().flatten() for m in (den, qf, qf_t) for p in m.parameters()])
        p_init = flat_params()
        torch.manual_seed(1)
        metrics = [update(batch) for _ in range(3)]
        runs.append((metrics, flat_params()))
    (m_eager, p_eager), (m_comp, p_comp) = runs
    for me, mc in zip(m_eager, m_comp):
        for k in me:
            assert torch.allclose(me[k], mc[k], rtol=1e-4, atol=1e-5), (k, me[k], mc[k])
    assert torch.allclose(p_eager, p_comp, rtol=1e-4, atol=1e-5), (p_eager - p_comp).abs().max()
    assert (p_eager - p_init).abs().max() > 1e-3  # the three updates did move the parameters


def test_target_denoiser_acts_in_the_critic_target_and_follows_by_polyak(monkeypatch):
    """--actor-tau < 1 (the official code's target score model): a' in the critic target comes from the target
    denoiser, which moves by φ̄ ← (1-τ)φ̄ + τφ after each update; ε_θ itself gets the QSM gradient."""
    S, A, B = 3, 2, 16
    args = qsm.Args(actor_tau=0.25, compile=False)
    torch.manual_seed(0)
    sched = qsm.Schedule(args.beta_schedule, args.diffusion_steps, torch.device("cpu"))
    den, qf, qf_t = qsm.Denoiser(S, A, (16, 16), 8), qsm.TwinQ(S, A, (16, 16)), qsm.TwinQ(S, A, (16, 16))
    den_t = copy.deepcopy(den)
    q_opt, a_opt = torch.optim.Adam(qf.parameters(), lr=1e-2), torch.optim.Adam(den.parameters(), lr=1e-2)
    sampled_with = []
    real_sample = qsm.ddpm_sample
    monkeypatch.setattr(qsm, "ddpm_sample", lambda d, *a, **k: sampled_with.append(d) or real_sample(d, *a, **k))
    update = qsm.make_update(den, den_t, qf, qf_t, q_opt, a_opt, sched, args)
    batch = {"obs": torch.randn(B, S), "next_obs": torch.randn(B, S), "actions": torch.rand(B, A) * 2 - 1,
             "rewards": torch.randn(B), "terminated": torch.zeros(B)}
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    for _ in range(3):
        before = flat(den_t)
        update(batch)
        assert torch.allclose(flat(den_t), 0.75 * before + 0.25 * flat(den), atol=1e-6)
    assert sampled_with == [den_t] * 3
    assert (flat(den_t) - flat(den)).abs().max() > 1e-3  # the target lags the denoiser


# --- environment handling ---------------------------------------------------------------------------------------
def test_vector_env_autoreset_truncation_and_action_bounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(env_id="QsmProbe-v0", num_envs=2, total_timesteps=400, learning_starts=200))
    rb = out["rb"]
    n = rb.size
    obs, nxt, act, term = rb.obs[:n], rb.next_obs[:n], rb.actions[:n], rb.terminated[:n]
    assert n > 250  # ~400 steps, minus the autoreset steps
    # no NEXT_STEP dummy: every stored transition advances the counter by exactly one (a dummy goes back to 0)
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
    assert np.abs(act).max() <= 1 and out["num_updates"] == 200


# --- end to end ---------------------------------------------------------------------------------------------
def test_main_logs_saves_and_reloads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(small_args(total_timesteps=500, learning_starts=100, eval_freq=250, eval_episodes=1,
                              save_model=True))
    assert out["num_updates"] == 400  # one per env step after learning_starts
    ea = EventAccumulator(out["run_dir"]).Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_loss", "losses/qf2_loss",
                "losses/qf1_values", "losses/actor_loss", "qsm/score_alignment", "qsm/dq_da_norm", "qsm/eps_norm",
                "eval/episodic_return"}
    assert expected <= tags, expected - tags
    assert len(ea.Scalars("eval/episodic_return")) == 2
    assert all(np.isfinite(e.value) for e in ea.Scalars("losses/actor_loss"))

    ckpt = glob.glob(f"{out['run_dir']}/qsm.pt")[0]
    sd = torch.load(ckpt, weights_only=True)
    assert torch.equal(sd["denoiser"]["net.0.weight"], out["denoiser"].state_dict()["net.0.weight"])
    # architecture flags come from the checkpoint, so the defaults (512 wide) must not matter here
    ev = qsm.main(qsm.Args(env_id="Pendulum-v1", checkpoint=ckpt, eval_only=True, eval_episodes=2, cuda=False,
                           compile=False))
    assert len(ev["eval_returns"]) == 2 and all(-2000 < r <= 0 for r in ev["eval_returns"])
    assert "eval Pendulum-v1: return" in capsys.readouterr().out
    # bad files: --resume of a weights-only file, a truncated checkpoint
    with pytest.raises(SystemExit, match="holds only networks"):
        qsm.main(qsm.Args(resume=ckpt))
    Path("cut.pt").write_bytes(Path(ckpt).read_bytes()[:1000])
    with pytest.raises(SystemExit, match="cannot read checkpoint 'cut.pt'"):
        qsm.main(qsm.Args(resume="cut.pt"))


# --- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(env_id="CartPole-v1"), "Discrete action space"),
    (dict(env_id="QsmUnboundedAction-v0"), "unbounded action space"),
    (dict(env_id="QsmImageObs-v0"), "flat (1-D) Box observation"),
    (dict(env_id="NoSuchEnv-v0"), "cannot make environment 'NoSuchEnv-v0'"),
    (dict(diffusion_steps=0), "--diffusion-steps must be ≥ 1"),
    (dict(batch_size=512, buffer_size=256), "larger than --buffer-size"),
    (dict(learning_starts=300, total_timesteps=300), "no update would run"),
    (dict(eval_only=True), "--eval-only needs --checkpoint"),
    (dict(checkpoint_freq=-1), "--checkpoint-freq must be ≥ 0"),
    (dict(resume="nowhere.pt"), "cannot read checkpoint 'nowhere.pt'"),
    (dict(capture_video=True, env_id="QsmProbe-v0"), "--capture-video: cannot render QsmProbe-v0"),
])
def test_bad_input_fails_before_training(kw, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MUJOCO_GL", raising=False)  # --capture-video sets it; undone after the test
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(**kw))
    assert message in str(e.value.code) and str(e.value.code).startswith("qsm.py: error:")
    assert not (tmp_path / "runs").exists()


def test_cartpole_cli_fails_fast():
    p = subprocess.run([sys.executable, str(HERE / "qsm.py"), "--env-id", "CartPole-v1"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0
    assert "CartPole-v1 has a Discrete action space" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 or "Warn" in p.stderr


# --- learning ----------------------------------------------------------------------------------------------------
def test_learns_pendulum(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = qsm.main(qsm.Args(env_id="Pendulum-v1", seed=1, total_timesteps=12_000, learning_starts=1000,
                            actor_hidden_dims=(256, 256), critic_hidden_dims=(256, 256), eval_freq=0, cuda=False,
                            compile=True))  # the compiled path, end to end (the other loop tests run eager)
    last = out["episodic_returns"]  # the last 10 training episodes (random policy ≈ -1200)
    assert len(last) == 10 and np.mean(last) >= -400, last


# --- long runs: reproducibility, checkpoints and resume, NaN guard, signals, video ------------------------------
def flat_params(*nets) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for net in nets for p in net.state_dict().values()])


def scalars(run_dir, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload().Scalars(tag)]


def keep_checkpoint_at(step: int, dest, monkeypatch):
    """Also write the checkpoint of `step` to dest, as if the run had crashed just after saving it."""
    save = qsm.save_checkpoint

    def spy(path, state):
        save(path, state)
        if state["counters"][0] == step:
            save(str(dest), state)

    monkeypatch.setattr(qsm, "save_checkpoint", spy)


def test_same_seed_same_run_other_seed_differs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [qsm.main(small_args(seed=s, total_timesteps=700, learning_starts=200, compile=True)) for s in (1, 1, 2)]
    returns = [scalars(r["run_dir"], "charts/episodic_return") for r in runs]
    params = [flat_params(r["denoiser"], r["qf"]) for r in runs]
    assert runs[0]["num_updates"] == 500 and len(returns[0]) == 3
    assert returns[0] == returns[1] and torch.equal(params[0], params[1])  # bit for bit
    assert returns[0] != returns[2] and not torch.allclose(params[0], params[2])


@pytest.mark.parametrize("actor_tau", [1.0, 0.05])  # 0.05: the target denoiser, which acts, is restored too
def test_resume_continues_the_run_exactly(actor_tau, tmp_path, monkeypatch, capsys):
    """Straight 800 steps vs the checkpoint at 400 resumed: Pendulum pickles with its state, so the resumed run is
    the same run: same parameters bit for bit, and one TensorBoard curve without overlap."""
    monkeypatch.chdir(tmp_path)
    keep_checkpoint_at(400, tmp_path / "at400.pt", monkeypatch)
    straight = qsm.main(small_args(total_timesteps=800, learning_starts=200, checkpoint_freq=200, actor_tau=actor_tau))
    before = {tag: scalars(straight["run_dir"], tag) for tag in ("charts/episodic_return", "losses/actor_loss")}
    ck = torch.load(tmp_path / "at400.pt", weights_only=True)
    assert ck["envs"] is not None and ck["counters"][:2] == (400, 200)
    assert ck["rb"]["size"] == 399  # step 201 was the autoreset after Pendulum's 200-step episode: not stored

    resumed = qsm.main(qsm.Args(resume=str(tmp_path / "at400.pt"), total_timesteps=5))  # flags from the checkpoint
    assert "ignoring total_timesteps" in capsys.readouterr().err
    assert resumed["run_dir"] == straight["run_dir"] and resumed["num_updates"] == 600
    assert torch.equal(flat_params(resumed["denoiser"], resumed["qf"]), flat_params(straight["denoiser"], straight["qf"]))
    for tag, curve in before.items():  # the steps after 400 were logged twice; the resumed writer purged the first
        assert scalars(straight["run_dir"], tag) == curve, tag
    assert [s for s, _ in before["losses/actor_loss"]] == list(range(250, 801, 50))


def test_resume_mujoco_starts_new_episodes(tmp_path, monkeypatch):
    """MuJoCo envs do not pickle with their state: all else is restored exactly, and the envs start new episodes."""
    monkeypatch.chdir(tmp_path)
    keep_checkpoint_at(300, tmp_path / "at300.pt", monkeypatch)
    straight = qsm.main(small_args(env_id="Hopper-v4", total_timesteps=600, learning_starts=200, checkpoint_freq=300))
    ck = torch.load(tmp_path / "at300.pt", weights_only=True)
    assert ck["envs"] is None and ck["counters"][0] == 300
    resumed = qsm.main(qsm.Args(resume=str(tmp_path / "at300.pt")))
    assert resumed["global_step"] == 600 and resumed["num_updates"] == straight["num_updates"] == 400
    a, b, n = straight["rb"], resumed["rb"], ck["rb"]["size"]
    assert np.array_equal(a.obs[:n], b.obs[:n]) and np.array_equal(a.actions[:n], b.actions[:n])
    reset_obs = gym.make("Hopper-v4").reset(seed=1 + 300)[0].astype(np.float32)  # seed + step
    np.testing.assert_array_equal(b.obs[n], reset_obs)  # the first transition after the resume starts an episode
    assert not np.array_equal(a.obs[n], b.obs[n])


class NaNRewardEnv(ProbeEnv):
    """The probe env, whose reward turns NaN after 250 steps (a bug in a user's reward function)."""

    def __init__(self):
        self.total = 0

    def step(self, action):
        self.total += 1
        obs, r, terminated, truncated, info = super().step(action)
        return obs, float("nan") if self.total > 250 else r, terminated, truncated, info


gym.register("QsmNaNReward-v0", entry_point=NaNRewardEnv, max_episode_steps=5)


@pytest.mark.parametrize("kw, loss", [
    (dict(env_id="QsmNaNReward-v0"), "losses/qf1_loss = nan"),
    (dict(actor_lr=1e30), "losses/actor_loss = "),
])
def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(kw, loss, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        qsm.main(small_args(**kw, total_timesteps=2000, learning_starts=200, checkpoint_freq=200))
    msg = str(e.value.code)
    assert msg.startswith("qsm.py: error: non-finite") and loss in msg and "at step " in msg, msg
    step = int(msg.split("at step ")[1].split()[0])
    path = msg.split("last good checkpoint: ")[1].split()[0]
    ck = torch.load(path, weights_only=True)
    assert step < 2000 and ck["counters"][0] == (step - 1) // 200 * 200 and ck["counters"][0] >= 200
    assert all(torch.isfinite(p).all() for net in ("denoiser", "qf") for p in ck[net].values())
    assert not glob.glob("runs/*/*.tmp")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_flushes_the_log(sig, tmp_path):
    cmd = [sys.executable, str(HERE / "qsm.py"), "--env-id", "Pendulum-v1", "--total-timesteps", "1000000",
           "--learning-starts", "10", "--batch-size", "32", "--actor-hidden-dims", "32", "32", "--critic-hidden-dims",
           "32", "32", "--no-compile", "--no-cuda", "--log-freq", "10"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = []  # stderr as it comes; tqdm's "N/1000000" says how far training is
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: p.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and max(map(int, re.findall(r"(\d+)/1000000", "".join(err))), default=0) < 60:
        time.sleep(0.2)
    p.send_signal(sig)
    p.wait(timeout=60)
    reader.join(timeout=10)
    err = "".join(err)
    assert p.returncode == 128 + sig, err[-2000:]
    assert f"stopped by {sig.name} at step" in err
    run_dir = glob.glob(str(tmp_path / "runs/*"))[0]
    ck = torch.load(f"{run_dir}/checkpoint.pt", weights_only=True)
    step = ck["counters"][0]
    assert step >= 60 and ck["counters"][1] == step - 10, step  # mid-training, an update per step after learning_starts
    logged = [s for s, _ in scalars(run_dir, "losses/qf1_loss")]
    assert logged[0] == 20 and step - 10 < logged[-1] <= step, (step, logged)  # the writer was flushed up to the stop


def test_capture_video(tmp_path):
    import ctypes.util

    if ctypes.util.find_library("EGL") is None:
        pytest.skip("no EGL library: headless MuJoCo rendering needs libegl1 + libgl1-mesa-dri (README)")
    cmd = [sys.executable, str(HERE / "qsm.py"), "--env-id", "InvertedPendulum-v4", "--total-timesteps", "300",
           "--learning-starts", "100", "--batch-size", "32", "--actor-hidden-dims", "32", "32", "--critic-hidden-dims",
           "32", "32", "--no-compile", "--no-cuda", "--eval-freq", "150", "--eval-episodes", "2", "--capture-video"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    videos = sorted(glob.glob(str(tmp_path / "videos/*/*.mp4")))
    assert [Path(v).name for v in videos] == ["step150-episode-0.mp4", "step300-episode-0.mp4"]  # first episode only
    from moviepy import VideoFileClip

    clip = VideoFileClip(videos[0])
    assert clip.duration > 0 and clip.get_frame(0).shape == (480, 480, 3) and clip.get_frame(0).std() > 0
    clip.close()
