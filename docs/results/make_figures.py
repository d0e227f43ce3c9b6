"""Tables and the error-against-epochs figure of the real-image runs, from the cache only.

Trains nothing: reads the runs that ``lightning-manifold-mixup flattening --dataset mnist`` and
``docs/results/run_queue.py`` stored under ``docs/results/runs``, prints the Markdown tables of
docs/results.md (finished runs only, with their count), and writes
``docs/results/compare-<dataset>.json``, ``docs/results/flattening-mnist.json`` and
``docs/results/error-curves.png``. Run from the repository root:
``python docs/results/make_figures.py``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lightning_manifold_mixup_recipes import paper_mnist
from lightning_manifold_mixup_recipes.analysis import plot_error_curves
from lightning_manifold_mixup_recipes.experiments import (
    METHODS,
    PRESETS,
    compare,
    format_paired,
    format_table,
    summarize,
)

CACHE = Path("docs/results/runs")
OUT = Path("docs/results")
TEST_SEEDS = (10, 11, 12, 13, 14)
PAPER = {  # none, input, manifold (paper Figure 9 and section 3.2)
    "bottleneck_sigma1": (50.08, 37.17, 43.44),
    "hidden1_sigma1": (51.73, 33.46, 31.65),
    "hidden1_rest": (78.67, 66.89, 40.98),
}


def _cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def flattening_table() -> None:
    runs = paper_mnist.flattening("mnist", range(5), cache_dir=CACHE, progress=False,
                                  cached_only=True)  # fmt: skip
    summary = {
        m: {k: v for k, v in s.items() if not k.endswith("_spectrum")}
        for m, s in summarize(runs).items()
    }
    (OUT / "flattening-mnist.json").write_text(json.dumps(summary, indent=1))
    cols = [k for k, _ in paper_mnist.FLATTENING_COLUMNS]
    print("| method | seeds | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for i, method in enumerate(METHODS):
        cells = []
        for key in cols:
            cell = _cell([r[key] for r in runs[method]]) if runs[method] else "-"
            if key in PAPER:
                cell += f" ({PAPER[key][i]})"
            cells.append(cell)
        seeds = [r["seed"] for r in runs[method]]
        print(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    for key in ("bottleneck_rest", "hidden1_rest", "bottleneck_sigma1"):
        base = {r["seed"]: r[key] for r in runs["none"]}
        for method in ("input", "manifold"):
            ratios = [r[key] / base[r["seed"]] for r in runs[method] if r["seed"] in base]
            if ratios:
                print(f"{key} {method} / none per seed: {_cell(ratios)}")
    print()


def main() -> None:
    flattening_table()
    choice_path = CACHE / "choice.json"
    if not choice_path.is_file():
        print("no search finished yet")
        return
    choice = json.loads(choice_path.read_text())
    chosen: dict[str, float] = choice["chosen"]
    print("search (validation error %, seed 0):", json.dumps(choice["val_err"]))
    print("chosen:", chosen)
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    search = {}
    for method, lr in chosen.items():
        search[method] = compare("fashion-mnist", seeds=(0,), methods=(method,), lr=lr,
                                 holdout=True, cache_dir=CACHE, progress=False,
                                 cached_only=True)[method]  # fmt: skip
    panels["Fashion-MNIST search (validation, seed 0)"] = search
    for dataset in ("fashion-mnist", "mnist"):
        results = {}
        for method, lr in chosen.items():
            results[method] = compare(dataset, seeds=TEST_SEEDS, methods=(method,), lr=lr,
                                      cache_dir=CACHE, progress=False,
                                      cached_only=True)[method]  # fmt: skip
        if not any(results.values()):
            continue
        panels[f"{dataset} (test, refit)"] = results
        done = {m: [r["seed"] for r in runs] for m, runs in results.items()}
        print(format_table(results, f"{dataset}: finished test runs {done}"))
        print(format_paired(results))
        print()
        (OUT / f"compare-{dataset}.json").write_text(json.dumps(summarize(results), indent=1))
    plot_error_curves(panels, str(OUT / "error-curves.png"), PRESETS["fashion-mnist"].curve_every)


if __name__ == "__main__":
    main()
