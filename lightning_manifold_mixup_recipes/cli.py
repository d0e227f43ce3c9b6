"""The ``lightning-manifold-mixup`` command line.

``fit``/``validate``/``test``/``predict`` are LightningCLI (configure the callback in YAML or
with ``--trainer.callbacks+=ManifoldMixupCallback``); ``compare``, ``flattening`` and
``spirals`` run the paper-style experiments of :mod:`lightning_manifold_mixup_recipes.experiments`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run_experiment"]

EXPERIMENTS = ("compare", "flattening", "spirals")
# Packages of the examples extra, named in the message when one is missing.
EXTRA_PACKAGES = {
    "jsonargparse": "jsonargparse",
    "matplotlib": "matplotlib",
    "mnist1d": "mnist1d",
    "sklearn": "scikit-learn",
    "torchmetrics": "torchmetrics",
    "torchvision": "torchvision",
    "tqdm": "tqdm",
}
USAGE = """usage: lightning-manifold-mixup COMMAND [options]

Experiments (argparse; COMMAND --help for their options):
  compare      no mixup vs input mixup vs manifold mixup, over seeds
  flattening   per-class singular values of a hidden layer (paper section 3.2)
  spirals      decision boundaries and a 2-D bottleneck (paper Figure 1)

LightningCLI (MixupClassifier and any LightningDataModule; COMMAND --help):
  fit, validate, test, predict

Needs the examples extra: pip install 'lightning-manifold-mixup[examples]'"""


def __getattr__(name: str) -> Any:
    if name == "MixupCLI":  # imported on use: it needs jsonargparse (the examples extra)
        from lightning_manifold_mixup_recipes.lightning_cli import MixupCLI

        return MixupCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _seeds(text: str) -> list[int]:
    """``"5"`` means seeds 0..4; ``"0,3,7"`` lists them."""
    if "," in text:
        return [int(s) for s in text.split(",") if s]
    return list(range(int(text)))


HOLDOUT_HELP = (
    "hold the validation split out of training and report validation error (the search "
    "protocol); by default the model is refit on training + validation data (the test protocol)"
)


# Real-image datasets: at least 5 test seeds (none used by any search), results cached per run.
REAL_SEEDS = [10, 11, 12, 13, 14]
FLATTENING_SEEDS = [0, 1, 2, 3, 4]
DEFAULT_CACHE = Path("runs") / "cache"
LOG_FILE = Path("runs") / "lightning.log"
LOG_HELP = "file that receives Lightning's per-run messages (default runs/lightning.log)"
CACHE_HELP = (
    "folder of per-run results (real-image datasets; default runs/cache): finished runs are "
    "read back, so a killed command resumes"
)


def default_seeds(command: str, dataset: str) -> list[int]:
    """The seeds a command runs when ``--seeds`` is not given: for ``compare`` ones no search
    used (the searches used 0 and 1), five on real images; for ``flattening`` 0 (0-4 on real
    images, where nothing is chosen)."""
    real = dataset in ("mnist", "fashion-mnist")
    if command == "compare":
        return REAL_SEEDS if real else [10, 11, 12]
    return FLATTENING_SEEDS if real else [0]


def _add_common_real(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, help="folder with the MNIST/Fashion IDX files")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=CACHE_HELP)
    parser.add_argument("--no-cache", action="store_true", help="train every run afresh")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: tabulate the runs already in the cache (the others are left out)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help='write {method: {metric: {"mean", "std", "values"}}} to this file',
    )


def _experiment_parser() -> argparse.ArgumentParser:
    from lightning_manifold_mixup_recipes.experiments import METHODS, PRESETS

    parser = argparse.ArgumentParser(prog="lightning-manifold-mixup")
    sub = parser.add_subparsers(dest="command", required=True)

    cmp = sub.add_parser("compare", help="no mixup vs input mixup vs manifold mixup, over seeds")
    cmp.add_argument("--dataset", default="mnist1d", choices=sorted(PRESETS))
    cmp.add_argument(
        "--seeds",
        type=_seeds,
        default=None,
        help="count or comma list (default 10,11,12; mnist, fashion-mnist: 10-14)",
    )
    cmp.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    cmp.add_argument("--steps", type=int, default=None, help="optimizer steps (preset's)")
    cmp.add_argument("--lr", type=float, default=None, help="peak learning rate (preset's)")
    cmp.add_argument("--alpha-input", type=float, default=None)
    cmp.add_argument("--alpha-manifold", type=float, default=None)
    cmp.add_argument("--fgsm-eps", type=float, default=0.1)
    cmp.add_argument("--holdout", action="store_true", help=HOLDOUT_HELP)
    cmp.add_argument("--accelerator", default="cpu")
    cmp.add_argument("--out", type=Path, default=None, help="write the raw results as JSON")
    cmp.add_argument("--log-file", type=Path, default=LOG_FILE, help=LOG_HELP)
    _add_common_real(cmp)

    flat = sub.add_parser("flattening", help="per-class singular values of a hidden layer")
    flat.add_argument(
        "--dataset",
        default="mnist1d",
        choices=["digits", "fashion-mnist", "mnist", "mnist1d", "spirals"],
        help="mnist, fashion-mnist: the paper's Appendix G network (784-3x1024-12-4x1024-10)",
    )
    flat.add_argument(
        "--seeds", type=_seeds, default=None, help="count or comma list (default 0; mnist: 0-4)"
    )
    flat.add_argument("--steps", type=int, default=None, help="optimizer steps (preset's)")
    flat.add_argument("--epochs", type=int, default=None, help="mnist: epochs (default 5)")
    flat.add_argument("--bottleneck", type=int, default=12, help="mnist: bottleneck width")
    flat.add_argument(
        "--train-size", type=int, default=None, help="mnist: training images (default all)"
    )
    flat.add_argument("--test-size", type=int, default=None, help="mnist: test images (all)")
    _add_common_real(flat)
    flat.add_argument("--log-file", type=Path, default=LOG_FILE, help=LOG_HELP)
    flat.add_argument("--holdout", action="store_true", help=HOLDOUT_HELP)
    flat.add_argument("--accelerator", default="cpu")
    flat.add_argument("--out", type=Path, default=None, help="JSON results")
    flat.add_argument("--plot", type=Path, default=None, help="PNG of the spectra")

    spi = sub.add_parser("spirals", help="decision boundaries and a 2-D bottleneck (Figure 1)")
    spi.add_argument("--steps", type=int, default=None, help="optimizer steps (preset's)")
    spi.add_argument("--seed", type=int, default=0)
    spi.add_argument("--holdout", action="store_true", help=HOLDOUT_HELP)
    spi.add_argument("--accelerator", default="cpu")
    spi.add_argument("--out", type=Path, default=Path("spirals.png"))
    return parser


def run_experiment(argv: Sequence[str]) -> None:
    from lightning_manifold_mixup_recipes import analysis

    args = _experiment_parser().parse_args(list(argv))
    if args.command == "compare":
        _run_compare(args)
    elif args.command == "flattening" and args.dataset in ("mnist", "fashion-mnist"):
        _run_paper_flattening(args)
    elif args.command == "flattening":
        if args.seeds is None:
            args.seeds = default_seeds("flattening", args.dataset)
        flat = analysis.flattening(
            args.dataset,
            seeds=args.seeds,
            steps=args.steps,
            holdout=args.holdout,
            accelerator=args.accelerator,
        )
        print(analysis.format_flattening(flat, args.dataset))
        if args.out is not None:
            args.out.write_text(json.dumps(flat, indent=2))
        if args.plot is not None:
            analysis.plot_spectra(flat, str(args.plot))
    else:
        errors = analysis.spirals_figure(
            str(args.out),
            steps=args.steps,
            seed=args.seed,
            holdout=args.holdout,
            accelerator=args.accelerator,
        )
        print("spirals test error %: " + ", ".join(f"{k} {v:.2f}" for k, v in errors.items()))
        print(f"figure written to {args.out}")


def _cache(args: argparse.Namespace) -> Path | None:
    return None if args.no_cache else args.cache


def _write_json(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))


def _finished(results: dict[str, list[dict[str, Any]]]) -> str:
    """With ``--cached-only``: which seeds each method has finished (empty when all ran)."""
    done = {m: [r.get("seed") for r in runs] for m, runs in results.items()}
    counts = {len(v) for v in done.values()}
    if len(counts) == 1:
        return f" ({counts.pop()} runs per method)"
    return " (finished seeds: " + "; ".join(f"{m} {v}" for m, v in done.items()) + ")"


def _run_paper_flattening(args: argparse.Namespace) -> None:
    from lightning_manifold_mixup_recipes import paper_mnist
    from lightning_manifold_mixup_recipes.experiments import summarize

    epochs = paper_mnist.FLATTENING_EPOCHS if args.epochs is None else args.epochs
    seeds = default_seeds("flattening", args.dataset) if args.seeds is None else args.seeds
    results = paper_mnist.flattening(
        args.dataset,
        seeds,
        bottleneck=args.bottleneck,
        epochs=epochs,
        train_size=args.train_size,
        test_size=args.test_size,
        data_dir=args.data_dir,
        cache_dir=_cache(args),
        cached_only=args.cached_only,
        log_file=args.log_file,
    )
    images = args.train_size or paper_mnist.TRAIN_IMAGES
    title = (
        f"{args.dataset}: Appendix G network, {args.bottleneck}-unit bottleneck, seeds {seeds}, "
        f"Adam lr {paper_mnist.LR:g}, batch {paper_mnist.BATCH}, {epochs} epochs on {images} "
        f"training images, alpha {paper_mnist.ALPHA:g}; per-class singular values of the test "
        "representations, averaged over classes, mean ± std over seeds" + _finished(results)
    )
    print(paper_mnist.format_flattening(results, title))
    summary = {
        m: {k: v for k, v in stats.items() if not k.endswith("_spectrum")}
        for m, stats in summarize(results).items()
    }
    _write_json(args, summary)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


def _run_compare(args: argparse.Namespace) -> None:
    from lightning_manifold_mixup_recipes import experiments as ex

    real = args.dataset in ex.REAL_DATASETS
    if args.seeds is None:
        args.seeds = default_seeds("compare", args.dataset)

    alphas = {
        k: v
        for k, v in (("input", args.alpha_input), ("manifold", args.alpha_manifold))
        if v is not None
    }
    results = ex.compare(
        args.dataset,
        seeds=args.seeds,
        methods=args.methods,
        steps=args.steps,
        fgsm_eps=args.fgsm_eps,
        alphas=alphas,
        lr=args.lr,
        holdout=args.holdout,
        accelerator=args.accelerator,
        cache_dir=_cache(args) if real else None,
        preset=ex.with_data_dir(args.dataset, args.data_dir),
        cached_only=args.cached_only,
        log_file=args.log_file,
    )
    preset = ex.PRESETS[args.dataset]
    lrs = {m: preset.lr[m] if args.lr is None else args.lr for m in args.methods}
    recipe = {
        "steps": preset.steps if args.steps is None else args.steps,
        **{f"lr {m}": lr for m, lr in lrs.items()},
        **{f"alpha {m}": a for m, a in {**preset.alphas, **alphas}.items() if m in args.methods},
    }
    protocol = "validation split held out" if args.holdout else "refit on train + validation"
    title = (
        f"{args.dataset}: seeds {args.seeds}, {protocol}, mean ± std, "
        + ", ".join(f"{k} {v:g}" for k, v in recipe.items())
        + f", FGSM eps={args.fgsm_eps} (in the units of the datamodule's inputs)"
        + _finished(results)
    )
    print(ex.format_table(results, title))
    paired = ex.format_paired(results)
    if paired:
        print()
        print(paired)
    _write_json(args, ex.summarize(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return
    # Every package of the extra is looked for before any work starts: one line, no traceback.
    missing = [
        pkg for name, pkg in EXTRA_PACKAGES.items() if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise SystemExit(
            f"lightning-manifold-mixup {args[0]}: the {missing[0]} package is missing; install "
            "the examples extra: pip install 'lightning-manifold-mixup[examples]'"
        )
    if args[0] in EXPERIMENTS:
        run_experiment(args)
        return
    from lightning_manifold_mixup_recipes.lightning_cli import run_lightning_cli

    run_lightning_cli(None if argv is None else args)


if __name__ == "__main__":
    main()
