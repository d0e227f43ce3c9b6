"""Paper-style experiments on built-in data: no mixup vs input mixup vs manifold mixup.

Every function here trains real models with ``Trainer.fit`` and the callback; the CLI
(``lightning-manifold-mixup compare|flattening|spirals``) calls them.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
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
    to 0 along a half cosine (``MixupClassifier(cosine=True)``; ``cosine=False``: constant).
    ``lr`` holds the peak learning rate per method (``"none"``, ``"input"``, ``"manifold"``):
    each method gets the one its own validation error chose, so no method is compared at
    another's best setting. ``alphas`` holds alpha per mixup method. ``curve_every`` > 0 records
    the error on the evaluation set (validation with a held-out split, else test) every that
    many steps, for error-against-epochs plots. ``tag`` names what the other fields cannot show
    (network width, data subset) in the result cache's file names.
    """

    datamodule: Callable[[int, bool], L.LightningDataModule]
    backbone: Callable[[], nn.Module]
    num_classes: int
    manifold_layers: tuple[str, ...]
    steps: int
    lr: dict[str, float]
    weight_decay: float = 1e-4
    alphas: dict[str, float] = field(default_factory=lambda: {"input": 1.0, "manifold": 2.0})
    cosine: bool = True
    curve_every: int = 0
    tag: str = ""


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


# Real images: a stratified 10000-image subset of the 60000 training images (the same for every
# seed), of which 10% (chosen by the seed) is the validation split of the search; the refit trains
# on all 10000. Batch 100 as the paper's code; no augmentation.
REAL_TRAIN_SIZE = 10000
REAL_BATCH = 100
REAL_EPOCHS = 10
REAL_WIDTH = 8


def _real(name: str, data_dir: str | None = None) -> Callable[[int, bool], L.LightningDataModule]:
    def build(seed: int, holdout: bool) -> L.LightningDataModule:
        from lightning_manifold_mixup_recipes.data import MNISTDataModule

        return MNISTDataModule(
            name,
            data_dir=data_dir,
            batch_size=REAL_BATCH,
            seed=seed,
            val_fraction=0.1 if holdout else 0.0,
            train_size=REAL_TRAIN_SIZE,
        )

    return build


def _preact_resnet_small() -> nn.Module:
    from lightning_manifold_mixup_recipes.models import PreActResNet18

    return PreActResNet18(num_classes=10, in_channels=1, width=REAL_WIDTH)


def _real_preset(name: str, lr: dict[str, float]) -> Preset:
    steps_per_epoch = REAL_TRAIN_SIZE // REAL_BATCH
    return Preset(
        datamodule=_real(name),
        backbone=_preact_resnet_small,
        num_classes=10,
        manifold_layers=("input", "net.layer1", "net.layer2"),
        steps=REAL_EPOCHS * steps_per_epoch,
        lr=lr,
        alphas={"input": 1.0, "manifold": 2.0},
        curve_every=steps_per_epoch,
        tag=f"preact18w{REAL_WIDTH}-n{REAL_TRAIN_SIZE}",
    )


def with_data_dir(name: str, data_dir: str | None) -> Preset:
    """The preset ``name`` reading MNIST / Fashion-MNIST from ``data_dir`` (IDX files)."""
    preset = PRESETS[name]
    if data_dir is None or name not in REAL_DATASETS:
        return preset
    return replace(preset, datamodule=_real(name, data_dir))


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
    # The small PreActResNet18 (width 8, 176k parameters) on 10000 real training images, 10
    # epochs. Learning rates: the search on Fashion-MNIST's validation split (seed 0, over 1e-3,
    # 3e-3, 1e-2 per method; docs/results/run_queue.py, docs/results.md) chose 3e-3 for every
    # method (no mixup: a tie with 1e-2, to the smaller); MNIST reuses them, unsearched.
    "fashion-mnist": _real_preset("fashion-mnist", {"none": 3e-3, "input": 3e-3, "manifold": 3e-3}),
    "mnist": _real_preset("mnist", {"none": 3e-3, "input": 3e-3, "manifold": 3e-3}),
}
REAL_DATASETS = ("fashion-mnist", "mnist")


def fast_mode() -> bool:
    """True when ``LMM_FAST=1``: notebooks and smoke tests shrink steps and seeds."""
    return os.environ.get("LMM_FAST", "") not in ("", "0")


LIGHTNING_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)


@contextmanager
def quiet_lightning(log_file: str | Path | None = None) -> Iterator[None]:
    """Keep Lightning's per-fit info lines and advice off the terminal while many small runs go
    by: dropped (warnings still shown), or with ``log_file`` all appended to that file."""
    loggers = [logging.getLogger(n) for n in LIGHTNING_LOGGERS]
    saved = [(lg.level, lg.handlers[:], lg.propagate) for lg in loggers]
    handler: logging.Handler | None = None
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    for lg in loggers:
        if handler is None:
            lg.setLevel(logging.WARNING)
        else:
            lg.setLevel(logging.INFO)
            lg.handlers = [handler]
            lg.propagate = False
    try:
        with warnings.catch_warnings():
            # Advice that does not apply to these small in-memory runs.
            for message in (".*LeafSpec.*", ".*does not have many workers.*", ".*log_every_n"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
            lg.setLevel(level)
            lg.handlers = handlers
            lg.propagate = propagate
        if handler is not None:
            handler.close()


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
    callbacks: Sequence[L.Callback] = (),
) -> tuple[MixupClassifier, L.LightningDataModule]:
    """Train one model with ``Trainer.fit``; returns the trained model and its datamodule.

    ``steps``, ``lr`` and ``alpha`` override the preset's recipe for ``method``. ``holdout``
    holds the validation split out of training (the search protocol); by default the model is
    refit on training and validation data together (the test protocol). Runs use
    ``threads`` torch threads and Lightning's ``deterministic=True``, so the same arguments
    give the same model bit for bit on one machine. ``progress``: a tqdm bar to advance by
    optimizer steps. ``callbacks``: more Lightning callbacks for the run.
    """
    preset = PRESETS[dataset] if isinstance(dataset, str) else dataset
    all_callbacks: list[L.Callback] = list(callbacks)
    if progress is not None:
        all_callbacks.append(_StepProgress(progress))
    with torch_threads(threads):
        L.seed_everything(seed, workers=True, verbose=False)
        dm = preset.datamodule(seed, holdout)
        model = MixupClassifier(
            preset.backbone(),
            preset.num_classes,
            optimizer="adam",
            lr=preset.lr[method] if lr is None else lr,
            weight_decay=preset.weight_decay,
            cosine=preset.cosine,
            train_metrics=False,
        )
        cb = make_callback(preset, method, seed, alpha)
        if cb is not None:
            all_callbacks.append(cb)
        trainer = L.Trainer(
            max_steps=preset.steps if steps is None else steps,
            accelerator=accelerator,
            devices=1,
            callbacks=all_callbacks,
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


@torch.no_grad()
def dataset_error(model: nn.Module, dataset: Any, batch_size: int = 1000) -> float:
    """Error % of ``model`` on an in-memory ``(x, y)`` tensor dataset, read in order.

    Reads the tensors directly, not through a ``DataLoader`` (each of whose iterators draws a
    seed from the global RNG), so measuring during training leaves the training draws alone.
    """
    x, y = dataset.tensors
    was_training = model.training
    model.eval()
    wrong = 0
    try:
        for start in range(0, len(y), batch_size):
            out = model(x[start : start + batch_size].to(_device(model)))
            wrong += int((out.argmax(1).cpu() != y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * wrong / len(y)


class ErrorCurve(L.Callback):
    """Records ``(step, error %)`` on the evaluation set every ``every`` optimizer steps: the
    validation split where the datamodule holds one out (:func:`has_holdout`), else the test set."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.points: list[tuple[int, float]] = []
        self.split = ""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step % self.every != 0 or (self.points and self.points[-1][0] == step):
            return
        dm: Any = getattr(trainer, "datamodule", None)
        held = has_holdout(dm)
        self.split = "val" if held else "test"
        self.points.append((step, dataset_error(pl_module, dm.val_set if held else dm.test_set)))


def _mean_std(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


_COLUMNS = (
    ("test_err", "test error %"),
    ("test_nll", "test NLL"),
    ("test_ece", "test ECE"),
    ("fgsm_acc", "FGSM acc %"),
    ("val_err", "val error %"),
)


def format_table(results: dict[str, list[dict[str, Any]]], title: str) -> str:
    """A Markdown table of mean ± std per method over seeds; the validation error column only
    where every run has one (runs with a held-out validation split)."""
    cols = list(_COLUMNS)
    runs_ = [r for runs in results.values() for r in runs]
    if not (runs_ and all("val_err" in r for r in runs_)):
        cols.remove(("val_err", "val error %"))
    lines = [
        f"{title}",
        "",
        "| method | " + " | ".join(name for _, name in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for method, runs in results.items():
        if not runs:  # none finished (tables of cached runs only)
            continue
        cells = [_mean_std([r[key] for r in runs]) for key, _ in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_key(
    dataset: str,
    preset: Preset,
    method: str,
    seed: int,
    *,
    steps: int,
    lr: float,
    alpha: float | None,
    holdout: bool,
    fgsm_eps: float,
) -> str:
    """The cache file name (relative) of one run: every setting that changes its result."""
    protocol = "holdout" if holdout else "refit"
    recipe = f"steps{steps}-lr{lr:g}" + ("" if alpha is None else f"-alpha{alpha:g}")
    tag = f"{preset.tag}-" if preset.tag else ""
    return f"{dataset}/{protocol}/{tag}{recipe}-eps{fgsm_eps:g}/{method}-seed{seed}.json"


def read_cached(path: Path | None) -> dict[str, Any] | None:
    """The stored result at ``path``, or None (no cache, no file, or a half-written one)."""
    if path is None or not path.is_file():
        return None
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return result


def write_cached(path: Path | None, result: dict[str, Any]) -> None:
    """Store ``result`` at ``path`` atomically (write, then rename)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {metric: {"mean", "std", "values"}}}`` over the numeric metrics of every run
    (sample std; 0 for one run). ``manifold-input`` (per-seed paired differences) is added
    where both methods ran on the same seeds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, runs in results.items():
        keys = (
            [k for k, v in runs[0].items() if isinstance(v, float) and k != "seed"] if runs else []
        )
        out[method] = {k: _stats([float(r[k]) for r in runs]) for k in keys}
    paired = paired_difference(results)
    if paired:
        out["manifold-input"] = {k: _stats(v) for k, v in paired.items()}
    return out


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def paired_difference(
    results: dict[str, list[dict[str, Any]]], a: str = "manifold", b: str = "input"
) -> dict[str, list[float]]:
    """Per seed that both ran (runs carry their ``seed``), ``a``'s metric minus ``b``'s, for the
    metrics both have, in ``a``'s order; {} where they share no seed."""
    if a not in results or b not in results:
        return {}
    by_seed = {r["seed"]: r for r in results[b] if "seed" in r}
    pairs = [(r, by_seed[r["seed"]]) for r in results[a] if r.get("seed") in by_seed]
    if not pairs:
        return {}
    keys = [k for k, v in pairs[0][0].items() if isinstance(v, float) and k in pairs[0][1]]
    return {k: [float(ra[k]) - float(rb[k]) for ra, rb in pairs] for k in keys}


def format_paired(results: dict[str, list[dict[str, Any]]]) -> str:
    """One Markdown row per metric: manifold minus input, mean ± std of per-seed differences."""
    paired = paired_difference(results)
    if not paired:
        return ""
    names = dict(_COLUMNS)
    cells = [f"{_mean_std(paired[k])}" for k, _ in _COLUMNS if k in paired]
    heads = [names[k] for k, _ in _COLUMNS if k in paired]
    return "\n".join(
        [
            "| manifold - input, per seed | " + " | ".join(heads) + " |",
            "|---" * (len(heads) + 1) + "|",
            "| mean ± std | " + " | ".join(cells) + " |",
        ]
    )


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
    cache_dir: str | Path | None = None,
    preset: Preset | None = None,
    cached_only: bool = False,
    log_file: str | Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Train every method on every seed; returns per-method lists of :func:`evaluate` dicts.

    ``steps``, ``lr`` (for every method) and ``alphas`` (per method) override the preset's
    recipe. ``holdout=True`` is the search protocol: the validation split is held out and each
    run reports its validation error (``val_err``); the default refits on training and
    validation data together and reports test numbers only. The default seeds served no
    choice (the search used 0 and 1). One progress bar counts the optimizer steps of all runs
    and names the run in progress.

    Each run's dict also holds its ``seed`` and, where the preset records one, its error
    ``curve`` (``[[step, error %], ...]``, on the split named by ``curve_split``). With
    ``cache_dir`` every finished run is stored there (:func:`run_key`) and read back instead of
    trained again, so a killed comparison resumes where it stopped. ``preset`` replaces the
    named dataset's preset (for example one reading another data directory). ``cached_only``
    trains nothing: runs missing from the cache are left out (tables of finished runs).
    ``log_file`` receives Lightning's per-run messages (:func:`quiet_lightning`).
    """
    from tqdm.auto import tqdm

    if dataset not in PRESETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(PRESETS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {METHODS}")
    recipe = PRESETS[dataset] if preset is None else preset
    n_steps = recipe.steps if steps is None else steps
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    jobs = [(m, s) for s in seeds for m in methods]
    cache = None if cache_dir is None else Path(cache_dir)
    bar = tqdm(
        total=len(jobs) * n_steps,
        desc=f"compare {dataset}: {len(jobs)} runs x {n_steps} steps",
        disable=not progress,
        unit="step",
        unit_scale=True,
    )
    with bar, quiet_lightning(log_file):
        for run, (method, seed) in enumerate(jobs, start=1):
            bar.set_postfix_str(f"run {run}/{len(jobs)}: {method}, seed {seed}")
            alpha = (alphas or {}).get(method)
            key = run_key(
                dataset,
                recipe,
                method,
                seed,
                steps=n_steps,
                lr=recipe.lr[method] if lr is None else lr,
                alpha=None if method == "none" else alpha or recipe.alphas[method],
                holdout=holdout,
                fgsm_eps=fgsm_eps,
            )
            path = None if cache is None else cache / key
            result = read_cached(path)
            if result is None and cached_only:
                continue
            if result is None:
                curve = [ErrorCurve(recipe.curve_every)] if recipe.curve_every > 0 else []
                model, dm = train(
                    recipe,
                    method,
                    seed,
                    steps=n_steps,
                    lr=lr,
                    alpha=alpha,
                    holdout=holdout,
                    accelerator=accelerator,
                    progress=bar if progress else None,
                    callbacks=curve,
                )
                result = {"seed": seed, **evaluate(model, dm, fgsm_eps)}
                if curve:
                    result["curve"] = [list(p) for p in curve[0].points]
                    result["curve_split"] = curve[0].split
                write_cached(path, result)
            bar.n = run * n_steps  # the last, partial update interval (or a cached run)
            bar.refresh()
            results[method].append(result)
    return results
