"""Speed of qsm.py's own update and acting code against this machine's fp32 matmul floor, eager vs compiled.

    python benchmarks/speed.py > benchmarks/speed_cpu.txt        # on a GPU machine: > benchmarks/speed_gpu.txt

One run measures, on Walker2d-v4 dimensions (obs 17, act 6, batch 256): the machine's fp32 matmul throughput, the
matmul FLOPs of one QSM update, and the median time of one update (critic step + QSM actor step + Polyak step) at the
paper's width (512) and at 256, eager and with --compile. Eager and compiled are timed in alternating rounds so that
the shared machine's noise hits both alike. It also times acting: one DDPM sample (T denoiser passes) at batch 1.
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qsm  # noqa: E402

OBS, ACT, BATCH = 17, 6, 256  # Walker2d-v4


class MatmulFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every matmul that runs (mm, addmm, bmm, baddbmm), forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket
        if op in (torch.ops.aten.mm, torch.ops.aten.bmm):
            self.flops += 2 * args[0].numel() * args[1].shape[-1]
        elif op in (torch.ops.aten.addmm, torch.ops.aten.baddbmm):
            self.flops += 2 * args[1].numel() * args[2].shape[-1]
        return func(*args, **(kwargs or {}))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, n):
    """Seconds per call of each of n calls."""
    out = []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def matmul_gflops(device, m=256, k=512, n=512, reps=200):
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    for _ in range(20):
        a @ b
    return 2 * m * k * n / statistics.median(timed(lambda: a @ b, device, reps)) / 1e9


def use_rng(rng: str):
    """Where compiled code draws its noise from now on: inductor's own RNG (as qsm.py) or torch's generator."""
    torch._inductor.config.fallback_random = rng == "torch"
    torch._dynamo.reset()  # the inductor config is not among dynamo's guards: compile afresh


def build(width, compile, device, seed=0, critic_norm="none", T=5):
    args = qsm.Args(actor_hidden_dims=(width, width), critic_hidden_dims=(width, width), compile=compile,
                    critic_norm=critic_norm, diffusion_steps=T)
    torch.manual_seed(seed)
    sched = qsm.Schedule(args.diffusion_steps, device)
    den = qsm.Denoiser(OBS, ACT, args.actor_hidden_dims, args.time_dim).to(device)
    qf = qsm.TwinQ(OBS, ACT, args.critic_hidden_dims, norm=critic_norm).to(device)
    qf_t = copy.deepcopy(qf)
    q_opt = torch.optim.Adam(qf.parameters(), lr=args.critic_lr, fused=True)
    a_opt = torch.optim.Adam(den.parameters(), lr=args.actor_lr, fused=True)
    update = qsm.make_update(den, qf, qf_t, q_opt, a_opt, sched, args)
    sample = torch.compile(qsm.ddpm_sample) if compile else qsm.ddpm_sample
    return update, lambda s: sample(den, sched, s, ACT), den, sched


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=6, help="alternating eager/compiled rounds")
    p.add_argument("--per-round", type=int, default=25, help="timed updates per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--widths", nargs="+", type=int, default=[512, 256], help="hidden widths to time")
    p.add_argument("--critic-norms", nargs="+", default=["none"], choices=["none", "layer"],
                   help="critics to time at every width (--critic-norm of qsm.py)")
    p.add_argument("--diffusion-steps", nargs="+", type=int, default=[5], help="T values to time at every width")
    p.add_argument("--rngs", nargs="+", default=["inductor"], choices=["inductor", "torch"],
                   help="where compiled code draws its noise: inductor's own RNG (qsm.py) or torch's generator")
    p.add_argument("--eager-only", action="store_true", help="skip the compiled path (a quick check that it runs)")
    o = p.parse_args()
    modes = (False,) if o.eager_only else (False, True)
    if o.threads:
        torch.set_num_threads(o.threads)
    device = torch.device("cuda" if o.cuda and torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"# benchmarks/speed.py — torch {torch.__version__}, {name}")
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {k: v.to(device) for k, v in {
        "obs": torch.randn(BATCH, OBS, generator=g), "next_obs": torch.randn(BATCH, OBS, generator=g),
        "actions": torch.rand(BATCH, ACT, generator=g) * 2 - 1, "rewards": torch.randn(BATCH, generator=g),
        "terminated": torch.zeros(BATCH)}.items()}

    peak = max(matmul_gflops(device), matmul_gflops(device, 1024, 1024, 1024, 20))
    print(f"fp32 matmul throughput: {peak:.1f} GFLOP/s (best of 256x512x512 and 1024^3)")
    rows = []
    for width, norm, T, rng in ((w, n, T, r) for w in o.widths for n in o.critic_norms for T in o.diffusion_steps
                                for r in o.rngs):
        use_rng(rng)
        update, _, _, _ = build(width, False, device, critic_norm=norm, T=T)
        with MatmulFlops() as fc:
            update(batch)
        floor_ms = fc.flops / peak / 1e6
        fns = {}
        for compile in modes:
            update, _, _, _ = build(width, compile, device, critic_norm=norm, T=T)
            t0 = time.perf_counter()
            for _ in range(5):  # warm-up (compilation for the compiled path)
                update(batch)
            sync(device)
            fns[compile] = update
            if compile:
                print(f"width {width}, critic norm {norm}, T={T}, {rng} RNG: compile + warm-up "
                      f"{time.perf_counter() - t0:.1f} s")
        times = {False: [], True: []}
        for _ in range(o.rounds):
            for compile in modes:
                times[compile] += timed(lambda: fns[compile](batch), device, o.per_round)
        rows.append((f"{width}/{norm}/T={T}/{rng}", fc.flops / 1e9, floor_ms, *(statistics.median(times[c]) * 1e3 for c in modes)))

    print("\nQSM update (critic step + QSM actor step + Polyak), Walker2d-v4 dims, batch 256; median ms/update")
    print(f"{'width/critic norm/T/RNG':>27} {'GFLOP':>7} {'floor ms':>9} {'eager ms':>9} {'of floor':>9} {'compiled ms':>12} "
          f"{'of floor':>9} {'speedup':>8}")
    for width, gflop, floor_ms, eager, *comp in rows:  # comp: [] with --eager-only
        print(f"{width:>27} {gflop:>7.3f} {floor_ms:>9.2f} {eager:>9.2f} {floor_ms / eager:>9.0%} " + (
            f"{comp[0]:>12.2f} {floor_ms / comp[0]:>9.0%} {eager / comp[0]:>7.2f}x" if comp else f"{'–':>12}"))

    use_rng("inductor")  # acting as qsm.py acts, whatever --rngs timed last
    print(f"\nActing: one DDPM sample (T=5 denoiser passes) at batch 1, width {o.widths[0]}; median ms")
    s1 = torch.randn(1, OBS, device=device)
    res = {}
    for compile in modes:
        _, act, _, _ = build(o.widths[0], compile, device)
        for _ in range(5):
            act(s1)
        res[compile] = statistics.median(timed(lambda: act(s1), device, 300)) * 1e3
    print(f"eager {res[False]:.3f} ms" + (f", compiled {res[True]:.3f} ms, speedup {res[False] / res[True]:.2f}x"
                                          if True in res else ""))


if __name__ == "__main__":
    main()
