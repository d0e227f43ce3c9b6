"""The long runs behind the real-image tables (issue 30), one after another, resumable.

1. The learning-rate search on Fashion-MNIST's validation split (seed 0; 1000 of the 10000
   training images held out), for each method over ``SEARCH_LRS``; the rest of the recipe is
   fixed (see ``PRESETS["fashion-mnist"]``).
2. The choice: per method, the learning rate of the lowest validation error (printed, and
   written to ``choice.json``).
3. The test runs, refit on all 10000 training images with the chosen learning rates, on seeds
   10-14 (which served no choice), Fashion-MNIST first, then MNIST (the same learning rates:
   MNIST gets no search of its own).

Every run is cached under ``--cache`` (default ``docs/results/runs``), so a killed queue
resumes where it stopped. Run from the repository root:

    OMP_NUM_THREADS=1 nice -n 5 python docs/results/run_queue.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lightning_manifold_mixup_recipes.experiments import METHODS, compare

SEARCH_LRS = (1e-3, 3e-3, 1e-2)
SEARCH_SEEDS = (0,)
TEST_SEEDS = (10, 11, 12, 13, 14)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path("docs/results/runs"))
    parser.add_argument("--steps", type=int, default=None, help="only for a smoke test")
    parser.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--test-seeds", type=int, nargs="+", default=list(TEST_SEEDS))
    args = parser.parse_args()

    val_err: dict[str, dict[float, float]] = {m: {} for m in METHODS}
    for lr in SEARCH_LRS:
        runs = compare(
            "fashion-mnist",
            seeds=SEARCH_SEEDS,
            steps=args.steps,
            lr=lr,
            holdout=True,
            cache_dir=args.cache,
            progress=False,
        )
        for method, results in runs.items():
            val_err[method][lr] = statistics.fmean(r["val_err"] for r in results)
            print(f"search fashion-mnist {method} lr {lr:g}: val error {val_err[method][lr]:.2f}")
    chosen = {m: min(errs, key=lambda lr: errs[lr]) for m, errs in val_err.items()}
    print("chosen learning rates:", chosen, flush=True)
    choice = {"val_err": {m: {f"{k:g}": v for k, v in e.items()} for m, e in val_err.items()}}
    (args.cache / "choice.json").write_text(json.dumps({**choice, "chosen": chosen}, indent=1))

    for dataset in args.datasets:
        for seed in args.test_seeds:
            for method in METHODS:
                compare(
                    dataset,
                    seeds=(seed,),
                    methods=(method,),
                    steps=args.steps,
                    lr=chosen[method],
                    cache_dir=args.cache,
                    progress=False,
                )
            print(f"test runs {dataset} seed {seed} done", flush=True)


if __name__ == "__main__":
    main()
