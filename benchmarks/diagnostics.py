"""Export QSM's TensorBoard diagnostics of finished runs to a CSV: the mean of each tag over step windows.

    python benchmarks/diagnostics.py benchmarks/.runs/runs/dm_control-* --out benchmarks/results/diagnostics.csv
"""
import argparse
import csv
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ["qsm/dq_da_norm", "qsm/eps_norm", "qsm/score_alignment", "losses/qf1_values", "policy/action_at_bounds",
        "policy/next_action_at_bounds", "policy/beats_random", "eval/episodic_return"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (runs/{run_name})")
    p.add_argument("--windows", nargs="+", default=["10000-20000", "40000-50000", "80000-100000"],
                   help="step windows lo-hi (inclusive)")
    p.add_argument("--out", required=True)
    o = p.parse_args()
    rows = []
    for run in o.runs:
        acc = EventAccumulator(run, size_guidance={"scalars": 0}).Reload()
        for tag in TAGS:
            if tag not in acc.Tags()["scalars"]:
                continue
            events = acc.Scalars(tag)
            for w in o.windows:
                lo, hi = map(int, w.split("-"))
                vals = [e.value for e in events if lo <= e.step <= hi]
                if vals:
                    rows.append(dict(run=Path(run).name, tag=tag, window=w, mean=round(sum(vals) / len(vals), 4)))
    with open(o.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "tag", "window", "mean"])
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r["run"][:60], r["tag"], r["window"], r["mean"])


if __name__ == "__main__":
    main()
