"""Evaluate the final policies of finished runs at several DDPM temperatures (0 = no noise injected in the reverse
steps; no exploration noise in any case) and write one CSV row per run and temperature. Re-running keeps the rows
already in --out and evaluates only the (run, temperature) pairs missing there, so runs can be added as they finish.

    python benchmarks/evaluate.py benchmarks/.runs/runs/Walker2d-v4__* --temperatures 0 1 --out benchmarks/results/eval.csv
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import qsm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders holding a checkpoint.pt")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--out", required=True)
    o = p.parse_args()
    torch.set_num_threads(1)
    rows = list(csv.DictReader(open(o.out))) if Path(o.out).exists() else []
    failed = []
    for run in o.runs:
        done = {float(r["temperature"]) for r in rows if r["run"] == Path(run).name}
        todo = [t for t in dict.fromkeys(o.temperatures) if t not in done]
        if not todo:  # all in --out already: no need to load the checkpoint (it holds the replay buffer)
            continue
        ckpt = str(Path(run) / "checkpoint.pt")
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            step, budget = saved["global_step"], saved["args"]["total_timesteps"]
        except Exception as e:  # missing, truncated, another program's file
            failed.append(f"evaluate.py: cannot read {ckpt}: {qsm.first_line(e)}")
            print(failed[-1], file=sys.stderr)
            continue
        if step < budget:
            print(f"skip {run}: its checkpoint is at step {step} of {budget}")
            continue
        for temp in todo:
            args = qsm.Args(env_id=saved["args"]["env_id"], seed=saved["args"]["seed"], eval_only=ckpt,
                            eval_episodes=o.episodes, ddpm_temperature=temp, cuda=False, compile=False)
            returns = qsm.main(args)["eval_returns"]
            rows.append(dict(run=Path(run).name, step=step, temperature=temp,
                             mean=round(float(np.mean(returns)), 1), std=round(float(np.std(returns)), 1)))
            write(rows, o.out)  # after every evaluation: a later failure loses nothing
    if failed:
        sys.exit(f"evaluate.py: {len(failed)} run(s) could not be evaluated (listed above)")


def write(rows: list[dict], out: str):
    tmp = f"{out}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "step", "temperature", "mean", "std"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
