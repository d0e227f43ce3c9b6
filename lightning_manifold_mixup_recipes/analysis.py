"""Analyses of trained runs: the flattening of hidden representations (paper section 3.2) and
the spirals figure (paper Figure 1), on the presets of :mod:`.experiments`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_manifold_mixup_recipes.experiments import (
    METHODS,
    MLP_LAYERS,
    PRESETS,
    Preset,
    _logits,
    _mean_std,
    evaluate,
    quiet_lightning,
    train,
)


def hidden_representation(model: nn.Module, layer: nn.Module, loader: DataLoader) -> Tensor:
    """Concatenated ``(N, D)`` outputs of ``layer`` over ``loader`` (flattened per sample)."""
    feats: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: feats.append(out.detach().flatten(1)))
    try:
        _logits(model, loader)
    finally:
        handle.remove()
    return torch.cat(feats).cpu()


def class_singular_values(h: Tensor, y: Tensor) -> dict[int, Tensor]:
    """Singular values of each class's centred-free hidden matrix ``h[y == c]`` (paper §3.2)."""
    return {int(c): torch.linalg.svdvals(h[y == c].double()).float() for c in y.unique()}


def flattening_preset(dataset: str = "mnist1d") -> Preset:
    """The MLP (256-256) preset ``f"{dataset}_mlp"`` if there is one, else one built from the
    dataset's preset (its data, steps, learning rate and alphas)."""
    if f"{dataset}_mlp" in PRESETS:
        return PRESETS[f"{dataset}_mlp"]
    from lightning_manifold_mixup_recipes.models import MLP

    base = PRESETS[dataset]
    in_features = {"mnist1d": 40, "digits": 64, "spirals": 2}[dataset]
    return replace(
        base,
        backbone=lambda: MLP(in_features, base.num_classes, hidden=(256, 256)),
        manifold_layers=MLP_LAYERS,
    )


def flattening(
    dataset: str = "mnist1d",
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    holdout: bool = False,
    accelerator: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """Per-class singular values of the first hidden layer of an MLP, for each method.

    Trains :func:`flattening_preset` and returns per method: ``non_leading`` (sum of all but
    the largest singular value, averaged over classes; one value per seed),
    ``all_classes_non_leading`` (the same over all classes together), ``relative`` (per class
    ``sum(s[1:]) / s[0]``, the non-leading mass relative to the leading direction, averaged
    over classes), ``test_err`` and ``spectrum`` (mean per-class spectrum of the first seed,
    for plots). The representations are those of the training set each model was fit on: by
    default training and validation data together, with ``holdout`` the training split only.
    """
    preset = flattening_preset(dataset)
    out: dict[str, dict[str, Any]] = {}
    with quiet_lightning():
        for method in METHODS:
            per_seed, relative, together, errors, spectrum = [], [], [], [], None
            for seed in seeds:
                model, dm = train(
                    preset, method, seed, steps=steps, holdout=holdout, accelerator=accelerator
                )
                dm.setup("fit")
                loader = dm.train_dataloader()
                h = hidden_representation(
                    model, model.net.get_submodule("layers.1"), _ordered(loader)
                )
                y = torch.cat([b[1] for b in _ordered(loader)])
                svs = class_singular_values(h, y)
                per_seed.append(statistics.fmean(float(s[1:].sum()) for s in svs.values()))
                relative.append(statistics.fmean(float(s[1:].sum() / s[0]) for s in svs.values()))
                together.append(float(torch.linalg.svdvals(h.double())[1:].sum()))
                errors.append(evaluate(model, dm, 0.0)["test_err"])
                if spectrum is None:
                    spectrum = torch.stack([s[:32] for s in svs.values()]).mean(0)
            out[method] = {
                "non_leading": per_seed,
                "all_classes_non_leading": together,
                "relative": relative,
                "test_err": errors,
                "spectrum": spectrum.tolist() if spectrum is not None else [],
            }
    return out


def _ordered(loader: DataLoader) -> DataLoader:
    """The same dataset and collate, unshuffled, so features and labels line up."""
    return DataLoader(loader.dataset, batch_size=512, shuffle=False, collate_fn=loader.collate_fn)


def spirals_figure(
    path: str,
    steps: int | None = None,
    seed: int = 0,
    holdout: bool = False,
    accelerator: str = "cpu",
) -> dict[str, float]:
    """Paper Figure 1: input-space boundaries and the 2-D bottleneck for the three methods.

    Writes a PNG to ``path``; returns the test error % per method. ``holdout`` as in
    :func:`train` (by default the models are refit on training and validation points).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    errors: dict[str, float] = {}
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    titles = {"none": "no mixup", "input": "input mixup", "manifold": "manifold mixup"}
    with quiet_lightning():
        for col, method in enumerate(METHODS):
            model, dm = train(
                "spirals", method, seed, steps=steps, holdout=holdout, accelerator=accelerator
            )
            dm.setup("test")
            test = dm.test_dataloader()
            x = torch.cat([b[0] for b in test])
            y = torch.cat([b[1] for b in test])
            errors[method] = evaluate(model, dm, 0.0)["test_err"]
            lim = float(x.abs().max()) * 1.1
            grid = torch.linspace(-lim, lim, 200)
            gx, gy = torch.meshgrid(grid, grid, indexing="xy")
            with torch.no_grad():
                probs = torch.softmax(model(torch.stack([gx, gy], -1).reshape(-1, 2)), 1)
            ax = axes[0, col]
            ax.contourf(gx, gy, probs.argmax(1).reshape(200, 200), alpha=0.3, cmap="brg")
            ax.contour(gx, gy, probs.max(1).values.reshape(200, 200), levels=[0.9], colors="k")
            ax.scatter(x[:, 0], x[:, 1], c=y, s=3, cmap="brg")
            ax.set_title(f"{titles[method]}: input space ({errors[method]:.1f}% err)")
            h = hidden_representation(model, model.net.get_submodule("bottleneck"), _ordered(test))
            axes[1, col].scatter(h[:, 0], h[:, 1], c=y, s=3, cmap="brg")
            axes[1, col].set_title(f"{titles[method]}: 2-D bottleneck")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return errors


def format_flattening(results: dict[str, dict[str, Any]], dataset: str) -> str:
    """A Markdown table of the flattening measure per method."""
    lines = [
        f"{dataset}: first hidden layer of an MLP, sum of non-leading singular values",
        "",
        "| method | per class (mean over classes) | all classes together | "
        "per class / leading | test error % |",
        "|---|---|---|---|---|",
    ]
    for method, r in results.items():
        lines.append(
            f"| {method} | {_mean_std(r['non_leading'])} | "
            f"{_mean_std(r['all_classes_non_leading'])} | {_mean_std(r['relative'])} | "
            f"{_mean_std(r['test_err'])} |"
        )
    return "\n".join(lines)


def plot_spectra(results: dict[str, dict[str, Any]], path: str) -> None:
    """Mean per-class singular value spectra, one line per method, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in results.items():
        ax.plot(range(1, len(r["spectrum"]) + 1), r["spectrum"], marker=".", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value (mean over classes)")
    ax.set_title("Per-class spectrum of the first hidden layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_error_curves(
    panels: dict[str, dict[str, list[dict[str, Any]]]], path: str, steps_per_epoch: int
) -> None:
    """Error % against epochs, one panel per entry of ``panels`` (title -> compare results
    whose runs hold a ``curve``), one line per method: the mean over runs, shaded ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels.items(), strict=True):
        split = ""
        for method, runs in results.items():
            curves = [r["curve"] for r in runs if r.get("curve")]
            if not curves:
                continue
            split = runs[0].get("curve_split", split)
            length = min(len(c) for c in curves)
            values = torch.tensor([[p[1] for p in c[:length]] for c in curves])
            epochs = [p[0] / steps_per_epoch for p in curves[0][:length]]
            mean = values.mean(0)
            std = values.std(0) if len(curves) > 1 else torch.zeros_like(mean)
            ax.plot(epochs, mean, marker=".", label=f"{method} ({len(curves)} runs)")
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split or 'test'} error %")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
