"""Paper-style experiments on built-in data: no mixup vs input mixup vs manifold mixup.

Every function here trains real models with ``Trainer.fit`` and the callback; the CLI
(``lightning-manifold-mixup compare|flattening|spirals``) calls them.
"""

from __future__ import annotations

import logging
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup_recipes.classifier import MixupClassifier

METHODS = ("none", "input", "manifold")
# Mixing points of the built-in MLP (256-256): the input and both hidden activations.
MLP_LAYERS = ("input", "net.layers.1", "net.layers.3")


@dataclass(frozen=True)
class Preset:
    """A dataset, its backbone and the training recipe used by ``compare``.

    ``datamodule(seed, holdout)`` builds the data: with ``holdout`` the validation split is held
    out of training (the search protocol, validation error reported); without it the model is
    refit on the training data and the validation split together (the test protocol), and the
    test set doubles as Lightning's validation set, so no validation error exists.

    Every run trains for ``steps`` optimizer steps with AdamW, its peak learning rate decayed
    to 0 along a half cosine (``MixupClassifier(cosine=True)``). ``lr`` holds the peak learning
    rate per method (``"none"``, ``"input"``, ``"manifold"``): each method gets the one its own
    validation error chose, so no method is compared at another's best setting. ``alphas``
    holds alpha per mixup method.
    """

    datamodule: Callable[[int, bool], L.LightningDataModule]
    backbone: Callable[[], nn.Module]
    num_classes: int
    manifold_layers: tuple[str, ...]
    steps: int
    lr: dict[str, float]
    weight_decay: float = 1e-4
    alphas: dict[str, float] = field(default_factory=lambda: {"input": 1.0, "manifold": 2.0})


def _mnist1d(seed: int, holdout: bool) -> L.LightningDataModule:
    from lightning_manifold_mixup_recipes.data import MNIST1DDataModule

    return MNIST1DDataModule(batch_size=100, seed=seed, val_fraction=0.1 if holdout else 0.0)


def _digits(seed: int, holdout: bool) -> L.LightningDataModule:
    from lightning_manifold_mixup_recipes.data import DigitsDataModule

    return DigitsDataModule(batch_size=64, seed=seed, val_fraction=0.1 if holdout else 0.0)


def _spirals(seed: int, holdout: bool) -> L.LightningDataModule:
    from lightning_manifold_mixup_recipes.data import SpiralsDataModule

    # Synthetic data: the refit draws as many training points as train + validation hold.
    if holdout:
        return SpiralsDataModule(batch_size=128, seed=seed, num_train=3000, num_val=600)
    return SpiralsDataModule(batch_size=128, seed=seed, num_train=3600, num_val=0)


def _cnn1d() -> nn.Module:
    from lightning_manifold_mixup_recipes.models import CNN1D

    return CNN1D(num_classes=10, channels=25)


def _small_cnn() -> nn.Module:
    from lightning_manifold_mixup_recipes.models import SmallCNN2D

    return SmallCNN2D(num_classes=10)


def _mnist1d_mlp() -> nn.Module:
    from lightning_manifold_mixup_recipes.models import MLP

    return MLP(40, 10, hidden=(256, 256))


def _spiral_mlp() -> nn.Module:
    from lightning_manifold_mixup_recipes.models import MLP

    return MLP(2, 3, hidden=(64, 64), bottleneck=2, activation="tanh")


# Recipes chosen on validation error only (seeds 0-1, validation split held out); the search is
# in docs/results.md. Test runs refit them on the training and validation data together.
PRESETS: dict[str, Preset] = {
    "mnist1d": Preset(
        datamodule=_mnist1d,
        backbone=_cnn1d,
        num_classes=10,
        manifold_layers=("input", "net.block1", "net.block2", "net.block3"),
        steps=6000,
        lr={"none": 3e-2, "input": 1e-2, "manifold": 1e-2},
        alphas={"input": 0.5, "manifold": 2.0},
    ),
    # The MLP of the flattening experiment (paper section 3.2).
    "mnist1d_mlp": Preset(
        datamodule=_mnist1d,
        backbone=_mnist1d_mlp,
        num_classes=10,
        manifold_layers=MLP_LAYERS,
        steps=6000,
        lr={"none": 1e-2, "input": 3e-3, "manifold": 3e-3},
        alphas={"input": 1.0, "manifold": 2.0},
    ),
    "digits": Preset(
        datamodule=_digits,
        backbone=_small_cnn,
        num_classes=10,
        manifold_layers=("input", "net.block1", "net.block2"),
        steps=3000,
        lr={"none": 3e-2, "input": 3e-2, "manifold": 3e-2},
        alphas={"input": 2.0, "manifold": 0.5},
    ),
    "spirals": Preset(
        datamodule=_spirals,
        backbone=_spiral_mlp,
        num_classes=3,
        manifold_layers=("input", "net.layers.1", "net.layers.3", "net.bottleneck"),
        steps=6000,
        lr={"none": 3e-3, "input": 3e-2, "manifold": 1e-2},
        alphas={"input": 0.1, "manifold": 2.0},
    ),
}


def fast_mode() -> bool:
    """True when ``LMM_FAST=1``: notebooks and smoke tests shrink steps and seeds."""
    return os.environ.get("LMM_FAST", "") not in ("", "0")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit info lines and advice while many small runs go by."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # Advice that does not apply to these small in-memory runs.
            for message in (".*LeafSpec.*", ".*does not have many workers.*", ".*log_every_n"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def make_callback(
    preset: Preset, method: str, seed: int, alpha: float | None = None
) -> ManifoldMixupCallback | None:
    """The callback for ``method`` (None for ``"none"``), seeded for reproducibility."""
    if method == "none":
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    layers = ["input"] if method == "input" else list(preset.manifold_layers)
    a = alpha if alpha is not None else preset.alphas[method]
    return ManifoldMixupCallback(layers=layers, alpha=a, seed=seed, log=False)


class _StepProgress(L.Callback):
    """Advances a shared tqdm bar (counting optimizer steps) every ``every`` steps."""

    def __init__(self, bar: Any, every: int = 50) -> None:
        self.bar = bar
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.bar.update(self.every)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (restored after).

    The thread count decides how reductions are split, so it changes results in the last bits,
    and those differences grow over thousands of steps; a fixed count makes runs repeat on
    any machine size.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    dataset: str | Preset,
    method: str,
    seed: int,
    *,
    steps: int | None = None,
    lr: float | None = None,
    alpha: float | None = None,
    holdout: bool = False,
    accelerator: str = "cpu",
    threads: int = 1,
    progress: Any = None,
) -> tuple[MixupClassifier, L.LightningDataModule]:
    """Train one model with ``Trainer.fit``; returns the trained model and its datamodule.

    ``steps``, ``lr`` and ``alpha`` override the preset's recipe for ``method``. ``holdout``
    holds the validation split out of training (the search protocol); by default the model is
    refit on training and validation data together (the test protocol). Runs use
    ``threads`` torch threads and Lightning's ``deterministic=True``, so the same arguments
    give the same model bit for bit on one machine. ``progress``: a tqdm bar to advance by
    optimizer steps.
    """
    preset = PRESETS[dataset] if isinstance(dataset, str) else dataset
    callbacks: list[L.Callback] = []
    if progress is not None:
        callbacks.append(_StepProgress(progress))
    with torch_threads(threads):
        L.seed_everything(seed, workers=True, verbose=False)
        dm = preset.datamodule(seed, holdout)
        model = MixupClassifier(
            preset.backbone(),
            preset.num_classes,
            optimizer="adam",
            lr=preset.lr[method] if lr is None else lr,
            weight_decay=preset.weight_decay,
            cosine=True,
            train_metrics=False,
        )
        cb = make_callback(preset, method, seed, alpha)
        if cb is not None:
            callbacks.append(cb)
        trainer = L.Trainer(
            max_steps=preset.steps if steps is None else steps,
            accelerator=accelerator,
            devices=1,
            callbacks=callbacks,
            logger=False,
            deterministic=True,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=dm)
    model.eval()
    return model, dm


@torch.no_grad()
def _logits(model: nn.Module, loader: DataLoader) -> tuple[Tensor, Tensor]:
    outs, ys = [], []
    for x, y in loader:
        outs.append(model(x.to(_device(model))).float().cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def expected_calibration_error(probs: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE (L1, equal-width confidence bins), as torchmetrics' MulticlassCalibrationError."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, y, num_classes=probs.shape[1], n_bins=n_bins))


def fgsm_accuracy(model: nn.Module, loader: DataLoader, eps: float) -> float:
    """Accuracy on FGSM examples ``x + eps * sign(grad_x CE)`` (Goodfellow et al. 2015)."""
    correct = total = 0
    device = _device(model)
    for x, y in loader:
        x = x.to(device).requires_grad_(True)
        y = y.to(device)
        loss = nn.functional.cross_entropy(model(x).float(), y)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            pred = model(x + eps * grad.sign()).argmax(1)
        correct += int((pred == y).sum())
        total += y.numel()
    return correct / total


def has_holdout(dm: L.LightningDataModule) -> bool:
    """Whether ``dm`` holds a validation split out of training (not the test set standing in)."""
    val, test = getattr(dm, "val_set", None), getattr(dm, "test_set", None)
    return val is not None and val is not test


def evaluate(model: nn.Module, dm: L.LightningDataModule, fgsm_eps: float) -> dict[str, float]:
    """Test error %, NLL, ECE and FGSM accuracy % of a trained model, and its validation error %
    (``val_err``) only where ``dm`` holds a validation split out (:func:`has_holdout`): after a
    refit the "validation" set is the test set, and its error must not be read as validation."""
    logits, y = _logits(model, dm.test_dataloader())
    out = {
        "test_err": 100.0 * float((logits.argmax(1) != y).float().mean()),
        "test_nll": float(nn.functional.cross_entropy(logits, y)),
        "test_ece": expected_calibration_error(torch.softmax(logits, 1), y),
        "fgsm_acc": 100.0 * fgsm_accuracy(model, dm.test_dataloader(), fgsm_eps),
    }
    if has_holdout(dm):
        val_logits, val_y = _logits(model, dm.val_dataloader())
        out["val_err"] = 100.0 * float((val_logits.argmax(1) != val_y).float().mean())
    return out


def _mean_std(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def format_table(results: dict[str, list[dict[str, float]]], title: str) -> str:
    """A Markdown table of mean ± std per method over seeds; the validation error column only
    where every run has one (runs with a held-out validation split)."""
    cols = [
        ("test_err", "test error %"),
        ("test_nll", "test NLL"),
        ("test_ece", "test ECE"),
        ("fgsm_acc", "FGSM acc %"),
    ]
    runs_ = [r for runs in results.values() for r in runs]
    if runs_ and all("val_err" in r for r in runs_):
        cols.append(("val_err", "val error %"))
    lines = [
        f"{title}",
        "",
        "| method | " + " | ".join(name for _, name in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for method, runs in results.items():
        cells = [_mean_std([r[key] for r in runs]) for key, _ in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    dataset: str = "mnist1d",
    seeds: Sequence[int] = (10, 11, 12),
    methods: Sequence[str] = METHODS,
    steps: int | None = None,
    fgsm_eps: float = 0.1,
    alphas: dict[str, float] | None = None,
    lr: float | None = None,
    holdout: bool = False,
    accelerator: str = "cpu",
    progress: bool = True,
) -> dict[str, list[dict[str, float]]]:
    """Train every method on every seed; returns per-method lists of :func:`evaluate` dicts.

    ``steps``, ``lr`` (for every method) and ``alphas`` (per method) override the preset's
    recipe. ``holdout=True`` is the search protocol: the validation split is held out and each
    run reports its validation error (``val_err``); the default refits on training and
    validation data together and reports test numbers only. The default seeds served no
    choice (the search used 0 and 1). One progress bar counts the optimizer steps of all runs
    and names the run in progress.
    """
    from tqdm.auto import tqdm

    if dataset not in PRESETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(PRESETS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {METHODS}")
    n_steps = PRESETS[dataset].steps if steps is None else steps
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    jobs = [(m, s) for s in seeds for m in methods]
    bar = tqdm(
        total=len(jobs) * n_steps,
        desc=f"compare {dataset}: {len(jobs)} runs x {n_steps} steps",
        disable=not progress,
        unit="step",
        unit_scale=True,
    )
    with bar, quiet_lightning():
        for run, (method, seed) in enumerate(jobs, start=1):
            bar.set_postfix_str(f"run {run}/{len(jobs)}: {method}, seed {seed}")
            alpha = (alphas or {}).get(method)
            model, dm = train(
                dataset,
                method,
                seed,
                steps=n_steps,
                lr=lr,
                alpha=alpha,
                holdout=holdout,
                accelerator=accelerator,
                progress=bar if progress else None,
            )
            bar.n = run * n_steps  # the last, partial update interval
            bar.refresh()
            results[method].append(evaluate(model, dm, fgsm_eps))
    return results
