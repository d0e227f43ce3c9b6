"""The command line: every shipped config trains, the callback is configurable by flag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from lightning_manifold_mixup import ManifoldMixupCallback
from lightning_manifold_mixup_recipes.classifier import MixupClassifier
from lightning_manifold_mixup_recipes.cli import _experiment_parser, default_seeds, main
from lightning_manifold_mixup_recipes.lightning_cli import MixupCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.precision=32-true",
]
OVERRIDES = {
    "cifar10_preactresnet18.yaml": [
        "--data.init_args.fake_data=true",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--model.backbone.init_args.width=8",
    ],
    "cifar100_preactresnet18.yaml": [
        "--data.init_args.fake_data=true",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        "--model.backbone.init_args.width=8",
    ],
}


def _fit_cli(args: list[str]) -> MixupCLI:
    """``lightning-manifold-mixup fit`` with ``args``, run in-process as the console script does."""
    return MixupCLI(
        MixupClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=["fit", *args],
        save_config_kwargs={"overwrite": True},
    )


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_trains_two_steps_with_the_callback(config: str, tmp_path: Path) -> None:
    cli = _fit_cli(
        [
            "--config",
            str(CONFIGS / config),
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
            *OVERRIDES.get(config, []),
        ]
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ManifoldMixupCallback)]
    assert len(callbacks) == 1 and callbacks[0].eligible[0] == "input"
    assert cli.trainer.global_step == 2
    assert cli.model.num_classes == cli.datamodule.num_classes


def test_callback_can_be_added_with_a_flag(tmp_path: Path) -> None:
    cli = _fit_cli(
        [
            "--data=lightning_manifold_mixup_recipes.data.SpiralsDataModule",
            "--model.backbone=lightning_manifold_mixup_recipes.models.MLP",
            "--model.backbone.in_features=2",
            "--model.backbone.num_classes=3",
            "--trainer.callbacks+=ManifoldMixupCallback",
            "--trainer.callbacks.layers=[net.layers.1]",
            "--trainer.callbacks.alpha=0.5",
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
        ]
    )
    added = [c for c in cli.trainer.callbacks if isinstance(c, ManifoldMixupCallback)]
    assert len(added) == 1
    assert added[0].config.alpha == 0.5 and added[0].eligible == ["net.layers.1"]
    assert cli.trainer.global_step == 2


def test_compare_prints_a_table_for_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    main(["compare", "--dataset", "spirals", "--seeds", "1", "--steps", "2"])
    out = capsys.readouterr().out
    for method in ("none", "input", "manifold"):
        assert f"| {method} |" in out
    assert "test error %" in out and "test ECE" in out and "FGSM acc %" in out


def test_compare_title_states_the_recipe_with_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    recipe = ["--steps", "3", "--lr", "0.05", "--alpha-manifold", "0.5"]
    main(["compare", "--dataset", "spirals", "--seeds", "0,7", "--methods", "manifold", *recipe])
    title = capsys.readouterr().out.splitlines()[0]
    assert title.startswith("spirals: seeds [0, 7]")
    assert "steps 3, lr manifold 0.05, alpha manifold 0.5, FGSM" in title


def test_compare_refits_by_default_and_reports_no_validation_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["compare", "--dataset", "spirals", "--seeds", "3,", "--steps", "2"])
    out = capsys.readouterr().out
    assert "refit on train + validation" in out.splitlines()[0]
    assert "val error %" not in out  # it would be the test error under another name


def test_compare_holdout_reports_the_validation_error(capsys: pytest.CaptureFixture[str]) -> None:
    main(["compare", "--dataset", "spirals", "--seeds", "3,", "--steps", "2", "--holdout"])
    out = capsys.readouterr().out
    assert "validation split held out" in out.splitlines()[0]
    assert "val error %" in out


def test_default_seeds_are_ones_the_search_did_not_use() -> None:
    parser = _experiment_parser()
    assert parser.parse_args(["compare"]).seeds is None  # resolved per dataset:
    assert default_seeds("compare", "mnist1d") == [10, 11, 12]
    assert default_seeds("compare", "mnist") == [10, 11, 12, 13, 14]
    assert not parser.parse_args(["compare"]).holdout
    assert parser.parse_args(["flattening", "--holdout"]).holdout
    assert parser.parse_args(["spirals", "--holdout"]).holdout


def test_compare_rejects_an_unknown_dataset() -> None:
    with pytest.raises(SystemExit):
        main(["compare", "--dataset", "imagenet"])


def test_help_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_manifold_mixup_recipes.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("compare", "flattening", "spirals", "fit", "validate", "test", "predict"):
        assert command in out


@pytest.mark.parametrize(
    ("command", "missing", "package"),
    [
        (["compare", "--steps", "1"], "mnist1d", "mnist1d"),
        (["fit", "--help"], "jsonargparse", "jsonargparse"),
    ],
)
def test_a_missing_extra_gets_one_line_naming_the_pip_command(
    command: list[str], missing: str, package: str
) -> None:
    code = (
        f"import sys; sys.modules[{missing!r}] = None; "
        f"from lightning_manifold_mixup_recipes.cli import main; main({command!r})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"lightning-manifold-mixup {command[0]}: the {package} package is missing; install "
        "the examples extra: pip install 'lightning-manifold-mixup[examples]'"
    )
