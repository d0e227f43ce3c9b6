"""pairing="global": two-process DDP on the CPU (gloo, ddp_spawn), partners from every rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import MLPClassifier, make_loader, quiet_trainer
from helpers import DecisionRecorder, Draw, StepRecorder, fake_trainer, mixup_of
from lightning_manifold_mixup import (
    ManifoldMixupCallback,
    ManifoldMixupMixin,
    MixedTarget,
    mix_targets,
    mix_tensor,
)
from lightning_manifold_mixup.mixing import (
    mix_targets_with_partner,
    mix_with_partner,
)

LAYERS = ["input", "net.1", "net.3"]
# The module whose input is the mixed tensor, for each mixing point.
NEXT = {"input": "net.0", "net.1": "net.2", "net.3": "net.4"}
B, WORLD, STEPS, SEED, LR = 3, 2, 6, 5, 0.1


class GlobalRecorder(StepRecorder):
    """Saves, per rank and step, the raw batch, the weights, the decision, the mixed target,
    the input of every layer that follows a mixing point, and the loss."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        modules = dict(pl_module.named_modules())
        for name in NEXT.values():
            modules[name].register_forward_pre_hook(self._pre_hook(name))

    def _pre_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                self.row["seen"][name] = args[0].detach().clone()

        return hook

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.row["seen"] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        mixup = mixup_of(trainer)
        final = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        record = {"rows": self.rows, "final": final, "hparams": mixup.hparams()}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")
        _drive_hooks_by_hand(trainer.global_rank, self.out)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_global")
    mixup = ManifoldMixupCallback(layers=LAYERS, seed=SEED, pairing="global", log=False)
    trainer = quiet_trainer(
        strategy="ddp_spawn",
        devices=WORLD,
        max_steps=STEPS,
        callbacks=[GlobalRecorder(out), mixup],
        limit_val_batches=0,
    )
    trainer.fit(MLPClassifier(), make_loader(n=48, batch_size=B))
    return [
        {
            **torch.load(out / f"rank{r}.pt", weights_only=False),
            "hooks": torch.load(out / f"hooks{r}.pt", weights_only=False),
        }
        for r in range(WORLD)
    ]


def _steps(run: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    rank0, rank1 = (r["rows"] for r in run)
    assert len(rank0) == len(rank1) == STEPS
    return list(zip(rank0, rank1, strict=True))


def _model(weights: dict[str, torch.Tensor]) -> MLPClassifier:
    model = MLPClassifier()
    model.load_state_dict(weights)
    return model


def _global_forward(
    model: MLPClassifier, rows: tuple[dict[str, Any], ...], detach_partner: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits of the global batch mixed by hand, and the mixed tensor seen by the next layer.

    Row ``r * B + i`` of the global batch is rank ``r``'s row ``i``; its partner is global row
    ``index_r[i]``. ``detach_partner`` cuts the gradient through the partner rows, as a gather
    without autograd would.
    """
    layer, lam = rows[0]["layer"], rows[0]["lam"]
    index = torch.cat([row["index"] for row in rows])

    def mix(h: torch.Tensor) -> torch.Tensor:
        partner = h[index].detach() if detach_partner else h[index]
        return lam * h + (1 - lam) * partner

    h = torch.cat([row["x"] for row in rows])
    mixed = {}
    if layer == "input":
        h = mixed["input"] = mix(h)
    for i, module in enumerate(model.net):
        h = module(h)
        if layer == f"net.{i}":
            h = mixed[layer] = mix(h)
    return h, mixed


def _hand_targets(rows: tuple[dict[str, Any], ...]) -> torch.Tensor:
    lam, index = rows[0]["lam"], torch.cat([row["index"] for row in rows])
    y = torch.cat([row["y"] for row in rows])
    eye = torch.eye(4)
    return lam * eye[y] + (1 - lam) * eye[y[index]]


def _hand_update(
    rows: tuple[dict[str, Any], ...], detach_partner: bool = False
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Each rank's loss and the weights after one SGD step on their mean (DDP's average)."""
    model = _model(rows[0]["weights"])
    logits, _ = _global_forward(model, rows, detach_partner)
    per_row = -(_hand_targets(rows) * torch.log_softmax(logits, -1)).sum(-1)
    losses = [part.mean() for part in per_row.split(B)]
    torch.stack(losses).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad  # type: ignore[operator]
    return losses, {k: v.detach() for k, v in model.state_dict().items()}


def test_every_rank_draws_the_same_layer_and_lam_and_one_global_permutation(
    run: list[dict[str, Any]],
) -> None:
    crossed = [0, 0]
    for r0, r1 in _steps(run):
        assert r0["layer"] == r1["layer"]
        assert torch.equal(r0["lam"], r1["lam"]) and r0["lam"].shape == ()
        assert r0["index"].shape == r1["index"].shape == (B,)
        assert sorted(torch.cat([r0["index"], r1["index"]]).tolist()) == list(range(WORLD * B))
        assert not torch.equal(r0["x"], r1["x"])  # each rank has its own shard
        crossed[0] += int((r0["index"] >= B).sum())
        crossed[1] += int((r1["index"] < B).sum())
    assert crossed[0] > 0 and crossed[1] > 0  # rows of each rank are partnered across ranks
    assert {r0["layer"] for r0, _ in _steps(run)} == set(LAYERS)  # the seed reaches every point


def test_mixed_tensor_equals_hand_computation_from_both_ranks(run: list[dict[str, Any]]) -> None:
    for rows in _steps(run):
        for key in rows[0]["weights"]:
            torch.testing.assert_close(rows[0]["weights"][key], rows[1]["weights"][key])
        layer = rows[0]["layer"]
        with torch.no_grad():
            _, mixed = _global_forward(_model(rows[0]["weights"]), rows)
        for rank, row in enumerate(rows):
            expected = mixed[layer][rank * B : (rank + 1) * B]
            torch.testing.assert_close(row["seen"][NEXT[layer]], expected)


def test_targets_are_soft_targets_of_the_global_labels(run: list[dict[str, Any]]) -> None:
    for rows in _steps(run):
        expected = _hand_targets(rows)
        for rank, row in enumerate(rows):
            assert row["target"].dtype == torch.float32
            torch.testing.assert_close(row["target"], expected[rank * B : (rank + 1) * B])


def test_losses_and_the_update_match_a_single_process_computation_of_the_global_batch(
    run: list[dict[str, Any]],
) -> None:
    """The update after each step is one SGD step on the mean loss of the global batch, with
    gradients through the partner rows: a gather without autograd would give a different one."""
    steps = _steps(run)
    after = [rows[0]["weights"] for rows in steps[1:]] + [run[0]["final"]]
    cut_differs = 0
    for rows, weights_after in zip(steps, after, strict=True):
        losses, expected = _hand_update(rows)
        for row, loss in zip(rows, losses, strict=True):
            assert torch.isfinite(row["loss"])
            torch.testing.assert_close(row["loss"], loss)
        for key, value in expected.items():
            torch.testing.assert_close(weights_after[key], value)
        if rows[0]["layer"] != "input":
            _, cut = _hand_update(rows, detach_partner=True)
            cut_differs += any(
                not torch.allclose(weights_after[k], v, rtol=1e-5, atol=1e-6)
                for k, v in cut.items()
            )
    assert cut_differs > 0  # the check above can tell gradients that stop at the gather


def test_hparams_record_the_pairing(run: list[dict[str, Any]]) -> None:
    assert run[0]["hparams"]["pairing"] == "global"


def _drive_hooks_by_hand(rank: int, out: Path) -> None:
    """Runs a fresh callback's hooks by hand in the fit's process group: per-sample lam, pair
    and float targets, and unequal batch sizes, without a second spawn's start-up cost."""
    torch.manual_seed(0)  # one initialisation on every rank, as DDP's broadcast would give
    module = MLPClassifier()
    torch.manual_seed(1 + rank)
    trainer = fake_trainer(world_size=WORLD, global_rank=rank)
    seen: dict[str, torch.Tensor] = {}
    module.net[2].register_forward_pre_hook(lambda m, a: seen.update(h=a[0].detach()))
    x, y = torch.randn(B, 8), torch.randint(0, 4, (B,))
    record: dict[str, Any] = {"x": x, "y": y, "weights": module.state_dict()}
    for kind in ("pair", "float"):
        targets: Any = "pair" if kind == "pair" else "soft"
        cb = ManifoldMixupCallback(
            layers=["net.1"],
            seed=SEED,
            pairing="global",
            lam_mode="sample",
            targets=targets,
            log=False,
        )
        cb.on_fit_start(trainer, module)
        batch = [x.clone(), y.clone() if kind == "pair" else torch.eye(4)[y]]
        cb.on_train_batch_start(trainer, module, batch, 0)
        assert cb.current is not None
        module(batch[0])
        record[kind] = {"lam": cb.current.lam, "index": cb.current.index, "target": batch[1]}
        record[kind]["seen"] = seen["h"]
        cb.on_train_batch_end(trainer, module, None, batch, 0)
        cb.teardown(trainer, module, "fit")
    uneven = [torch.randn(B + rank, 8), torch.randint(0, 4, (B + rank,))]
    try:
        cb.on_train_batch_start(trainer, module, uneven, 1)
    except ValueError as err:
        record["error"] = str(err)
    torch.save(record, out / f"hooks{rank}.pt")


@pytest.fixture(scope="module")
def hooks_run(run: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r["hooks"] for r in run]


def test_per_sample_lam_is_the_ranks_slice_of_one_global_draw(
    hooks_run: list[dict[str, Any]],
) -> None:
    model = _model(hooks_run[0]["weights"])
    with torch.no_grad():
        h = torch.cat([F.relu(model.net[0](r["x"])) for r in hooks_run])
    y = torch.cat([r["y"] for r in hooks_run])
    lams = [r["pair"]["lam"] for r in hooks_run]
    assert all(lam.shape == (B,) for lam in lams) and not torch.equal(*lams)
    for rank, r in enumerate(hooks_run):
        rows = slice(rank * B, (rank + 1) * B)
        for kind in ("pair", "float"):
            assert torch.equal(r[kind]["lam"], r["pair"]["lam"])
            assert torch.equal(r[kind]["index"], r["pair"]["index"])
        lam, index = r["pair"]["lam"], r["pair"]["index"]
        col = lam[:, None]
        torch.testing.assert_close(r["pair"]["seen"], col * h[rows] + (1 - col) * h[index])
        target = r["pair"]["target"]
        assert isinstance(target, MixedTarget)
        assert torch.equal(target.y_a, r["y"]) and torch.equal(target.y_b, y[index])
        assert torch.equal(target.lam, lam)
        eye = torch.eye(4)
        expected = col * eye[y[rows]] + (1 - col) * eye[y[index]]
        torch.testing.assert_close(r["float"]["target"], expected)


def test_unequal_batch_sizes_raise_on_every_rank(hooks_run: list[dict[str, Any]]) -> None:
    for r in hooks_run:
        assert "[3, 4]" in r["error"] and "drop_last=True" in r["error"]


def _single_process_draws(pairing: Any) -> list[Draw]:
    recorder = DecisionRecorder()
    mixup = ManifoldMixupCallback(layers=LAYERS, seed=SEED, pairing=pairing, log=False)
    trainer = quiet_trainer(max_steps=4, callbacks=[mixup, recorder])
    trainer.fit(MLPClassifier(), make_loader(n=32, batch_size=4))
    return recorder.draws


def test_global_pairing_in_one_process_warns_and_draws_as_local() -> None:
    local = _single_process_draws("local")
    with pytest.warns(UserWarning, match="pairing='global' has no effect"):
        global_ = _single_process_draws("global")
    assert global_ == local and len(local) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mix_with_partner_is_mix_tensor_with_the_partner_rows_given(dtype: torch.dtype) -> None:
    h = torch.randn(5, 3).to(dtype)
    index = torch.randperm(5)
    for lam in (torch.tensor(0.3), torch.rand(5)):
        expected = mix_tensor(h, lam, index)
        for overwrite in (False, True):
            out = mix_with_partner(h, h[index], lam, overwrite_partner=overwrite)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="partner must match h"):
        mix_with_partner(h, h[:4], torch.tensor(0.3))


def test_targets_with_partner_equal_targets_with_index() -> None:
    y, index, lam = torch.tensor([0, 2, 1, 3]), torch.tensor([2, 0, 3, 1]), torch.tensor(0.4)
    soft = mix_targets_with_partner(y, y[index], lam, num_classes=4)
    torch.testing.assert_close(soft, mix_targets(y, lam, index, num_classes=4), rtol=0, atol=0)
    pair = mix_targets_with_partner(y, y[index], lam, pair=True)
    assert isinstance(pair, MixedTarget) and torch.equal(pair.y_b, y[index])
    y_float = torch.eye(4)[y]
    torch.testing.assert_close(
        mix_targets_with_partner(y_float, y_float[index], lam), mix_targets(y_float, lam, index)
    )


# ------------------------------------------------------------------ CutMix across ranks


class BoxNet(ManifoldMixupMixin, L.LightningModule):
    """A small CNN on (B, 1, 4, 4) images that saves, per step, its clean input, the clean
    output of ``net.1``, what the next layer saw, the decision and the targets."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.num_classes = 3
        self.out = out
        self.net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2, 2, 3, padding=1),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        )
        self.rows: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        cb = mixup_of(self.trainer)
        d, clean = cb.current, cb.clean_input
        cb.current = None
        with torch.no_grad():
            h = self.net[1](self.net[0](clean))
        cb.current = d
        seen: list[torch.Tensor] = []
        handle = self.net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        logits = self(batch[0])
        handle.remove()
        assert d is not None
        self.rows.append(
            {
                "layer": d.layer,
                "index": d.index.clone(),
                "lam": float(cb.current.lam),  # type: ignore[union-attr]
                "box": cb.current.box,  # type: ignore[union-attr]
                "clean": clean.clone(),
                "x": batch[0].detach().clone(),
                "h": h,
                "seen": seen[0],
                "y": batch[1].detach().clone(),
            }
        )
        return self.mixup_loss(logits, batch[1])

    def on_train_end(self) -> None:
        torch.save(self.rows, self.out / f"box{self.global_rank}.pt")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_cutmix_pastes_the_box_from_partners_on_every_rank(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    mixup = ManifoldMixupCallback(
        layers=["input", "net.1"], seed=SEED, pairing="global", cutmix_prob=1.0, log=False
    )
    trainer = quiet_trainer(
        strategy="ddp_spawn", devices=WORLD, max_steps=8, callbacks=[mixup], limit_val_batches=0
    )
    trainer.fit(BoxNet(tmp_path), loader)
    ranks = [torch.load(tmp_path / f"box{r}.pt", weights_only=False) for r in range(WORLD)]
    eye = torch.eye(3)
    layers = set()
    for rows in zip(*ranks, strict=True):
        assert len({(r["layer"], r["box"], r["lam"]) for r in rows}) == 1  # one shared draw
        layer, box = rows[0]["layer"], rows[0]["box"]
        layers.add(layer)
        every = torch.cat([r["clean"] if layer == "input" else r["h"] for r in rows])
        # each rank's own labels, found by its clean input rows in the dataset
        own_y = [y[[int((x == row).all((1, 2, 3)).nonzero()) for row in r["clean"]]] for r in rows]
        labels = torch.cat(own_y)
        for r, y_own in zip(rows, own_y, strict=True):
            own = r["clean"] if layer == "input" else r["h"]
            got = r["x"] if layer == "input" else r["seen"]
            torch.testing.assert_close(got, box.paste(own, every[r["index"]]))
            soft = r["lam"] * eye[y_own] + (1 - r["lam"]) * eye[labels[r["index"]]]
            torch.testing.assert_close(r["y"], soft)
    assert layers == {"input", "net.1"}
