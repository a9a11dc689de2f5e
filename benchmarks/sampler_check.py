"""The sampler tests of test_qsm.py for other flags: does a candidate (e.g. more reverse steps with a greedier M_q)
still land its sampled actions near argmax Q, off the clip, and keep the two-optima bandit bimodal, at every critic
scale? Prints the tests' numbers and PASS/FAIL instead of asserting.

    python benchmarks/sampler_check.py --diffusion-steps 10 --q-grad-scale 3
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402
import test_qsm as t  # noqa: E402  (the sampler tests' critics and training loop)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusion-steps", type=int, default=qsm.Args.diffusion_steps)
    p.add_argument("--q-grad-scale", type=float, default=qsm.Args.q_grad_scale)
    p.add_argument("--steps", type=int, default=1500, help="training steps of the denoiser (the tests' 1500; the "
                   "bandit gets 2/3 of them, as in the tests)")
    o = p.parse_args()
    torch.set_num_threads(1)
    flags = dict(diffusion_steps=o.diffusion_steps, q_grad_scale=o.q_grad_scale)
    print(f"T = {o.diffusion_steps}, M_q = {o.q_grad_scale}")
    for k in t.SCALES:
        den, _, sched, args = t.train_qsm(t.quadratic_q(k), 4, 2, steps=o.steps, **flags)
        torch.manual_seed(123)
        s, a0 = torch.randn(2048, 4), torch.rand(2048, 2) * 2 - 1
        _, diag = qsm.qsm_loss(den, t.AnalyticQ(t.quadratic_q(k)), sched, {"obs": s, "actions": a0}, args)
        dist, uniform, at_bounds = t.sampled_actions_vs_argmax(den, sched, s)
        align = diag["qsm/score_alignment"]
        ok = align >= t.MIN_ALIGNMENT and dist <= uniform * t.MAX_DISTANCE and at_bounds < t.MAX_AT_BOUNDS
        print(f"  argmax, k = {k}: alignment {align:.3f} (≥ {t.MIN_ALIGNMENT}), distance / uniform's "
              f"{dist / uniform:.2f} (≤ {t.MAX_DISTANCE:.2f}), at ±1 {at_bounds:.2f} (< {t.MAX_AT_BOUNDS}): "
              f"{'PASS' if ok else 'FAIL'}")
    for k in t.SCALES:
        den, _, sched, _ = t.train_qsm(t.bimodal_q(k), 1, 1, steps=o.steps * 2 // 3,
                                       sample_states=lambda n: torch.zeros(n, 1), **flags)
        torch.manual_seed(7)
        a = qsm.ddpm_sample(den, sched, torch.zeros(4000, 1), 1)[:, 0]
        near = functools.partial(t.share_near, a)
        bounds = (a.abs() >= 1).float().mean().item()
        ok = min(near(0.6), near(-0.6)) >= t.MIN_MODE and near(0.0) < t.MAX_VALLEY and bounds < t.MAX_AT_BOUNDS
        print(f"  bandit, k = {k}: near +0.6 {near(0.6):.2f}, near -0.6 {near(-0.6):.2f} (≥ {t.MIN_MODE} each), near 0 "
              f"{near(0.0):.2f} (< {t.MAX_VALLEY}), at ±1 {bounds:.2f} (< {t.MAX_AT_BOUNDS}): {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
