"""The paper's MNIST experiments with fully connected bottleneck networks.

* :func:`flattening`: Appendix G (and section 3.2). The network 784 -> 3 x 1024 LeakyReLU ->
  12-unit bottleneck -> 4 x 1024 LeakyReLU -> 10 is trained without mixup, with input mixup,
  and with manifold mixup at the bottleneck only (alpha 2.0 for both); then, per class, the
  singular values of the test representations at the bottleneck and at the first hidden layer
  are computed; the largest (sigma_1) and the sum of the others are averaged over classes.
* :func:`bottleneck_2d`: Appendix B, Figure 5: the 2-D bottleneck network's test points.

Training recipe (the paper states none): Adam (AdamW with weight decay 0, i.e. Adam) at a
constant learning rate of 1e-4, batch 256, as the official code's deleted MNIST script
(``supervised/simple_mnist_exp.py``); that script trained 30 epochs, cut here to
``FLATTENING_EPOCHS`` to fit the budget of about an hour on 2 CPU cores for 15 runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_manifold_mixup_recipes.experiments import (
    METHODS,
    Preset,
    dataset_error,
    quiet_lightning,
    read_cached,
    summarize,
    train,
    write_cached,
)

__all__ = [
    "FLATTENING_EPOCHS",
    "PAPER_FLATTENING",
    "bottleneck_2d",
    "flattening",
    "flattening_preset",
    "format_flattening",
    "per_class_singular_values",
]

FLATTENING_EPOCHS = 5
BATCH = 256
LR = 1e-4
ALPHA = 2.0
FIGURE5_ALPHA = 0.5  # the official 2-D bottleneck script's Beta(0.5, 0.5)
TRAIN_IMAGES = 60000
# The paper's numbers, none / input / manifold (12-unit bottleneck unless the key says 30).
PAPER_FLATTENING = {
    "bottleneck_sigma1 (Figure 9)": (50.08, 37.17, 43.44),
    "bottleneck_sigma1, 30 units (Figure 10)": (14.68, 12.49, 14.43),
    "hidden1_sigma1 (section 3.2)": (51.73, 33.46, 31.65),
    "hidden1_rest (section 3.2)": (78.67, 66.89, 40.98),
}
# The representations measured: the mixing point and the first hidden layer's activation.
MEASURED = {"bottleneck": "net.bottleneck", "hidden1": "net.encoder.1"}


def _steps(epochs: int, train_size: int | None) -> int:
    n = TRAIN_IMAGES if train_size is None else train_size
    return epochs * -(-n // BATCH)


def flattening_preset(
    dataset: str = "mnist",
    *,
    bottleneck: int = 12,
    epochs: int = FLATTENING_EPOCHS,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
    encoder: Sequence[int] = (1024, 1024, 1024),
    decoder: Sequence[int] = (1024, 1024, 1024, 1024),
    bottleneck_norm: bool = False,
) -> Preset:
    """The Appendix G network and recipe as a :class:`Preset` (no validation split: nothing is
    chosen; the recipe is the official script's)."""
    from lightning_manifold_mixup_recipes.data import MNISTDataModule
    from lightning_manifold_mixup_recipes.models import BottleneckMLP

    def datamodule(seed: int, holdout: bool) -> L.LightningDataModule:
        return MNISTDataModule(
            dataset,
            data_dir=data_dir,
            batch_size=BATCH,
            seed=seed,
            val_fraction=0.1 if holdout else 0.0,
            train_size=train_size,
            test_size=test_size,
        )

    def backbone() -> nn.Module:
        return BottleneckMLP(784, 10, encoder, bottleneck, decoder, bottleneck_norm=bottleneck_norm)

    return Preset(
        datamodule=datamodule,
        backbone=backbone,
        num_classes=10,
        manifold_layers=("net.bottleneck",),
        steps=_steps(epochs, train_size),
        lr={m: LR for m in METHODS},
        weight_decay=0.0,
        alphas={"input": ALPHA, "manifold": ALPHA},
        cosine=False,
        tag=f"b{bottleneck}-e{epochs}-n{train_size or TRAIN_IMAGES}"
        + ("" if test_size is None else f"-test{test_size}"),
    )


@torch.no_grad()
def representations(model: nn.Module, layer: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    """``(N, D)`` outputs of ``layer`` for the inputs ``x``, read in order, in eval mode."""
    feats: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: feats.append(out.detach().flatten(1)))
    model.eval()
    try:
        for start in range(0, len(x), batch):
            model(x[start : start + batch])
    finally:
        handle.remove()
    return torch.cat(feats)


def per_class_singular_values(h: Tensor, y: Tensor) -> list[Tensor]:
    """Singular values (descending) of each class's matrix ``h[y == c]``, not centred, in
    class order (paper section 3.2)."""
    return [torch.linalg.svdvals(h[y == c].double()) for c in y.unique(sorted=True)]


def _measure(model: nn.Module, dm: Any) -> dict[str, Any]:
    x, y = dm.test_set.tensors
    out: dict[str, Any] = {"test_err": dataset_error(model, dm.test_set)}
    for name, path in MEASURED.items():
        svs = per_class_singular_values(representations(model, model.get_submodule(path), x), y)
        out[f"{name}_sigma1"] = statistics.fmean(float(s[0]) for s in svs)
        out[f"{name}_rest"] = statistics.fmean(float(s[1:].sum()) for s in svs)
        width = min(len(s) for s in svs)
        spectrum = torch.stack([s[:width] for s in svs]).mean(0)
        out[f"{name}_spectrum"] = [float(v) for v in spectrum[:32]]
    return out


def flattening(
    dataset: str = "mnist",
    seeds: Sequence[int] = range(5),
    *,
    bottleneck: int = 12,
    epochs: int = FLATTENING_EPOCHS,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    cached_only: bool = False,
    log_file: str | Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train the Appendix G network per method and seed; measure the test representations.

    Returns per method one dict per seed: ``seed``, ``test_err``, and for ``bottleneck`` and
    ``hidden1`` (the first hidden layer) ``*_sigma1`` and ``*_rest`` (the largest singular
    value and the sum of the others, each averaged over the 10 classes) and ``*_spectrum``
    (the mean per-class spectrum, up to 32 values). ``train_size``/``test_size``: use that many
    training / test images (quick runs). With ``cache_dir`` each run is stored and read back
    instead of retrained, so a killed run resumes; ``cached_only`` trains nothing and leaves out
    the runs missing from the cache. ``log_file`` receives Lightning's per-run messages.
    """
    from tqdm.auto import tqdm

    preset = flattening_preset(
        dataset,
        bottleneck=bottleneck,
        epochs=epochs,
        train_size=train_size,
        test_size=test_size,
        data_dir=data_dir,
    )
    jobs = [(m, s) for s in seeds for m in METHODS]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    bar = tqdm(
        total=len(jobs) * preset.steps,
        desc=f"flattening {dataset}: {len(jobs)} runs x {preset.steps} steps",
        disable=not progress,
        unit="step",
        unit_scale=True,
    )
    with bar, quiet_lightning(log_file):
        for run, (method, seed) in enumerate(jobs, start=1):
            bar.set_postfix_str(f"run {run}/{len(jobs)}: {method}, seed {seed}")
            path = None
            if cache_dir is not None:
                path = Path(cache_dir) / "flattening" / dataset / preset.tag
                path = path / f"{method}-seed{seed}.json"
            result = read_cached(path)
            if result is None and cached_only:
                continue
            if result is None:
                model, dm = train(preset, method, seed, progress=bar if progress else None)
                dm.setup("test")
                result = {"seed": seed, **_measure(model, dm)}
                write_cached(path, result)
            bar.n = run * preset.steps
            bar.refresh()
            results[method].append(result)
    return results


FLATTENING_COLUMNS = (
    ("bottleneck_sigma1", "bottleneck sigma1"),
    ("bottleneck_rest", "bottleneck sum rest"),
    ("hidden1_sigma1", "1st hidden sigma1"),
    ("hidden1_rest", "1st hidden sum rest"),
    ("test_err", "test error %"),
)


def format_flattening(results: dict[str, list[dict[str, Any]]], title: str) -> str:
    """A Markdown table, mean ± std over seeds, with the paper's numbers for the 12-unit net."""
    summary = summarize(results)
    lines = [
        title,
        "",
        "| method | " + " | ".join(name for _, name in FLATTENING_COLUMNS) + " |",
        "|---" * (len(FLATTENING_COLUMNS) + 1) + "|",
    ]
    for method in results:
        if not results[method]:
            continue
        cells = [
            f"{summary[method][k]['mean']:.2f} ± {summary[method][k]['std']:.2f}"
            for k, _ in FLATTENING_COLUMNS
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bottleneck_2d(
    dataset: str = "mnist",
    seed: int = 0,
    *,
    alpha: float = FIGURE5_ALPHA,
    epochs: int = FLATTENING_EPOCHS,
    train_size: int | None = None,
    test_size: int | None = None,
    data_dir: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Appendix B, Figure 5: 784 -> 2 x 1024 -> 2 (+ BatchNorm) -> 2 x 1024 -> 10, per method.

    Returns per method ``points`` (the (N, 2) test representations at the bottleneck, after its
    BatchNorm, as a tensor), ``labels`` and ``test_err``. Same recipe as :func:`flattening`,
    except alpha: the official script's 0.5 by default.
    """
    preset = flattening_preset(
        dataset,
        bottleneck=2,
        epochs=epochs,
        train_size=train_size,
        test_size=test_size,
        data_dir=data_dir,
        encoder=(1024, 1024),
        decoder=(1024, 1024),
        bottleneck_norm=True,
    )
    out: dict[str, dict[str, Any]] = {}
    with quiet_lightning():
        for method in METHODS:
            model, dm_ = train(preset, method, seed, alpha=None if method == "none" else alpha)
            dm: Any = dm_
            dm.setup("test")
            x, y = dm.test_set.tensors
            points = representations(model, model.get_submodule("net.bottleneck"), x)
            out[method] = {
                "points": points,
                "labels": y,
                "test_err": dataset_error(model, dm.test_set),
            }
    return out
