"""Tables and the error-against-epochs figure of the real-image runs, from the cache only.

Trains nothing: reads the runs ``docs/results/run_queue.py`` stored under ``docs/results/runs``
and writes ``docs/results/compare-<dataset>.json`` and ``docs/results/error-curves.png``.
Run from the repository root: ``python docs/results/make_figures.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_manifold_mixup_recipes.analysis import plot_error_curves
from lightning_manifold_mixup_recipes.experiments import (
    PRESETS,
    compare,
    format_paired,
    format_table,
    summarize,
)

CACHE = Path("docs/results/runs")
OUT = Path("docs/results")
TEST_SEEDS = (10, 11, 12, 13, 14)


def main() -> None:
    choice = json.loads((CACHE / "choice.json").read_text())["chosen"]
    panels = {}
    search = {}
    for method, lr in choice.items():
        runs = compare("fashion-mnist", seeds=(0,), methods=(method,), lr=lr, holdout=True,
                       cache_dir=CACHE, progress=False, cached_only=True)  # fmt: skip
        search[method] = runs[method]
    panels["Fashion-MNIST search (validation, seed 0)"] = search
    for dataset in ("fashion-mnist", "mnist"):
        results = {m: [] for m in choice}
        for method, lr in choice.items():
            results[method] = compare(dataset, seeds=TEST_SEEDS, methods=(method,), lr=lr,
                                      cache_dir=CACHE, progress=False,
                                      cached_only=True)[method]  # fmt: skip
        if not any(results.values()):
            continue
        panels[f"{dataset} (test, refit)"] = results
        print(format_table(results, f"{dataset}: finished test runs"))
        print(format_paired(results))
        (OUT / f"compare-{dataset}.json").write_text(json.dumps(summarize(results), indent=1))
    steps_per_epoch = PRESETS["fashion-mnist"].curve_every
    plot_error_curves(panels, str(OUT / "error-curves.png"), steps_per_epoch)


if __name__ == "__main__":
    main()
