"""Same seed and flags, same run, across two versions of qsm.py: four short runs (eager and compiled, a MuJoCo env
with two envs, the CrossQ critic and a target denoiser, the paper's loss with exploration noise), whose parameters,
last returns and replay buffers are compared bit for bit.

    git show 568eaf2:qsm.py > /tmp/qsm_before.py      # the version before the two-part restructure
    python benchmarks/bitcheck.py /tmp/qsm_before.py /tmp/before.pt
    python benchmarks/bitcheck.py qsm.py /tmp/after.pt --compare /tmp/before.pt
"""
import importlib.util, os, sys, tempfile, torch, numpy as np
import argparse
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("qsm"), p.add_argument("out"), p.add_argument("--compare", default=None)
o = p.parse_args()
spec = importlib.util.spec_from_file_location("qsm_under_test", os.path.abspath(o.qsm)); qsm = importlib.util.module_from_spec(spec)
sys.modules["qsm_under_test"] = qsm; spec.loader.exec_module(qsm)
torch.set_num_threads(1)
out = {}
configs = {
  "pendulum_eager": dict(env_id="Pendulum-v1", total_timesteps=700, learning_starts=200, compile=False),
  "pendulum_compiled": dict(env_id="Pendulum-v1", total_timesteps=500, learning_starts=200, compile=True),
  "hopper_bn_tau": dict(env_id="Hopper-v4", total_timesteps=500, learning_starts=200, compile=False, critic_norm="batch", actor_tau=0.05, num_envs=2),
  "paper_cfg": dict(env_id="Pendulum-v1", total_timesteps=500, learning_starts=200, compile=False, normalize_q_grad=False, q_grad_scale=50, exploration_noise=0.1),
}
for name, kw in configs.items():
    os.chdir(tempfile.mkdtemp())
    base = dict(batch_size=32, buffer_size=10_000, actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), eval_freq=250, eval_episodes=1, log_freq=50, cuda=False, checkpoint_freq=0)
    base.update(kw)
    r = qsm.main(qsm.Args(**base))
    out[name] = dict(params=torch.cat([p.detach().flatten() for net in (r["denoiser"], r["qf"]) for p in net.state_dict().values() if p.is_floating_point()]),
                     returns=torch.tensor(r["episodic_returns"]), obs=torch.from_numpy(r["rb"].obs[: r["rb"].size].copy()))
    print(name, "parameter sum", out[name]["params"].sum().item(), flush=True)
torch.save(out, o.out)
if o.compare:
    ref = torch.load(o.compare)
    for name in ref:
        same = all(torch.equal(ref[name][f], out[name][f]) for f in ref[name])
        print(f"{name}: {'identical, bit for bit' if same else 'DIFFERENT'}")
