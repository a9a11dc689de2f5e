"""Same seed and flags, same run, across two versions of qsm.py: four short runs (eager and compiled; a MuJoCo env,
two envs, the LayerNorm critic and a target denoiser; the paper's loss with exploration noise), whose parameters, last
returns and replay buffers are compared bit for bit.

    git show 568eaf2:qsm.py > /tmp/qsm_before.py      # the version before the two-part restructure
    python benchmarks/bitcheck.py /tmp/qsm_before.py /tmp/before.pt
    python benchmarks/bitcheck.py qsm.py /tmp/after.pt --compare /tmp/before.pt
"""
import argparse
import importlib.util
import os
import sys
import tempfile

import torch

CONFIGS = {
    "pendulum_eager": dict(env_id="Pendulum-v1", total_timesteps=700, compile=False),
    "pendulum_compiled": dict(env_id="Pendulum-v1", total_timesteps=500, compile=True),
    "hopper_layer_norm_critic_2_envs": dict(env_id="Hopper-v4", total_timesteps=500, compile=False, critic_norm="layer",
                                            num_envs=2),
    "papers_loss_with_noise": dict(env_id="Pendulum-v1", total_timesteps=500, compile=False, normalize_q_grad=False,
                                   q_grad_scale=50, exploration_noise=0.1),
}
SMALL = dict(learning_starts=200, batch_size=32, buffer_size=10_000, actor_hidden_dims=(32, 32),
             critic_hidden_dims=(32, 32), eval_freq=250, eval_episodes=1, log_freq=50, cuda=False, checkpoint_freq=0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qsm", help="the qsm.py to run")
    p.add_argument("out", help="where to save what the runs produced")
    p.add_argument("--compare", help="what another version produced (an `out` of an earlier call)")
    o = p.parse_args()
    spec = importlib.util.spec_from_file_location("qsm_under_test", os.path.abspath(o.qsm))
    qsm = importlib.util.module_from_spec(spec)
    sys.modules["qsm_under_test"] = qsm
    spec.loader.exec_module(qsm)
    torch.set_num_threads(1)
    out = {}
    for name, kw in CONFIGS.items():
        os.chdir(tempfile.mkdtemp())
        r = qsm.main(qsm.Args(**{**SMALL, **kw}))
        params = [p.detach().flatten() for net in (r["denoiser"], r["qf"]) for p in net.state_dict().values()
                  if p.is_floating_point()]
        out[name] = dict(params=torch.cat(params), returns=torch.tensor(r["episodic_returns"]),
                         obs=torch.from_numpy(r["rb"].obs[: r["rb"].size].copy()))
    torch.save(out, o.out)
    ref = torch.load(o.compare) if o.compare else {}
    for name in out:
        same = name in ref and all(torch.equal(ref[name][k], out[name][k]) for k in out[name])
        print(f"{name}: parameter sum {out[name]['params'].sum().item():.6f}" + (
            f", {'identical bit for bit' if same else 'DIFFERENT'}" if o.compare else ""))


if __name__ == "__main__":
    main()
