"""Inside a real Trainer.fit, the callback's mix equals the paper's formula recomputed by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lightning_manifold_mixup import ManifoldMixupCallback, ManifoldMixupMixin

Reference = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Probe(ManifoldMixupMixin, L.LightningModule):
    """Records, per step, the decision, the unmixed hidden state computed by hand from the
    model's own submodules, and what the next module actually received."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        reference: Reference | None,
        next_module: str | None,
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.reference = reference
        self.next_module = next_module
        self.head = head
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return self.head(out) if self.head is not None else out

    def _callback(self) -> ManifoldMixupCallback:
        return next(c for c in self.trainer.callbacks if isinstance(c, ManifoldMixupCallback))  # type: ignore[attr-defined]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        cb = self._callback()
        decision = cb.current
        record: dict[str, Any] = {"decision": decision, "x": x.clone(), "y": y.clone()}
        if decision is not None and self.reference is not None:
            cb.current = None  # hand computation runs the unmixed submodules
            with torch.no_grad():
                record["h"] = self.reference(self.net, x)
            cb.current = decision
        seen: list[torch.Tensor] = []
        handle = None
        if self.next_module is not None:
            handle = self.get_submodule(self.next_module).register_forward_pre_hook(
                lambda m, args: seen.append(args[0].detach().clone())
            )
        logits = self(x)
        if handle is not None:
            handle.remove()
            record["seen"] = seen[0]
        self.records.append(record)
        return self.mixup_loss(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _expected(h: torch.Tensor, lam: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if lam.ndim == 1:
        lam = lam.view(-1, *([1] * (h.ndim - 1)))
    return lam * h + (1 - lam) * h[index]


def _resnet_stem_layer1(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_resnet_stage_boundary_mix_equals_hand_computation(lam_mode: str) -> None:
    net = torchvision.models.resnet18(num_classes=5)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    model = Probe(net, 5, _resnet_stem_layer1, "net.layer2")
    cb = ManifoldMixupCallback(layers=["net.layer1"], lam_mode=lam_mode, seed=3)  # type: ignore[arg-type]
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    assert len(model.records) == 2
    for step, rec in enumerate(model.records):
        d = rec["decision"]
        assert d.layer == "net.layer1"
        assert d.lam.shape == ((4,) if lam_mode == "sample" else ())
        torch.testing.assert_close(rec["seen"], _expected(rec["h"], d.lam, d.index))
        y_b = y[4 * step : 4 * step + 4]
        eye = torch.eye(5)
        lam_col = d.lam.view(-1, 1) if lam_mode == "sample" else d.lam
        torch.testing.assert_close(rec["y"], lam_col * eye[y_b] + (1 - lam_col) * eye[y_b[d.index]])


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_input_mixup_mixes_the_batch_input_and_targets(lam_mode: str) -> None:
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = Probe(net, 3, None, "net.0")
    cb = ManifoldMixupCallback(layers=["input"], lam_mode=lam_mode, seed=0)  # type: ignore[arg-type]
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(model, _loader(x, y, 4))
    for step, rec in enumerate(model.records):
        d = rec["decision"]
        assert d.layer == "input"
        x_b, y_b = x[4 * step : 4 * step + 4], y[4 * step : 4 * step + 4]
        torch.testing.assert_close(rec["x"], _expected(x_b, d.lam, d.index))
        torch.testing.assert_close(rec["seen"], rec["x"])  # the first layer got the mixed input
        torch.testing.assert_close(rec["y"], _expected(torch.eye(3)[y_b], d.lam, d.index))


class _MeanHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.mean(dim=1))


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
def test_transformer_layer_mix_of_btd_hidden_equals_hand_computation(lam_mode: str) -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    net = nn.Sequential(nn.Linear(4, 16), encoder, _MeanHead())
    x, y = torch.randn(8, 5, 4), torch.randint(0, 3, (8,))

    def reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        enc = net[1]
        return enc.layers[1](enc.layers[0](net[0](x)))

    model = Probe(net, 3, reference, "net.1.layers.2")
    cb = ManifoldMixupCallback(layers=["net.1.layers.1"], lam_mode=lam_mode, seed=5)  # type: ignore[arg-type]
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    for rec in model.records:
        d = rec["decision"]
        assert rec["seen"].shape == (4, 5, 16)
        torch.testing.assert_close(rec["seen"], _expected(rec["h"], d.lam, d.index))


def test_layer_and_lam_are_drawn_per_batch_over_the_eligible_set() -> None:
    x, y = torch.randn(160, 6), torch.randint(0, 3, (160,))
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model = Probe(net, 3, None, None)
    cb = ManifoldMixupCallback(layers=["input", "net.1", "net.3"], seed=1)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(model, _loader(x, y, 4))
    layers = {r["decision"].layer for r in model.records}
    lams = {float(r["decision"].lam) for r in model.records}
    assert layers == {"input", "net.1", "net.3"}
    assert len(lams) == len(model.records)


def test_float_targets_are_mixed_without_one_hot() -> None:
    x, y = torch.randn(8, 6), torch.rand(8, 3)
    model = Probe(nn.Sequential(nn.Linear(6, 3)), 3, None, None)
    cb = ManifoldMixupCallback(layers=["input"], seed=2)
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    for step, rec in enumerate(model.records):
        d = rec["decision"]
        torch.testing.assert_close(rec["y"], _expected(y[4 * step : 4 * step + 4], d.lam, d.index))


def test_probability_zero_leaves_inputs_untouched_and_labels_one_hot() -> None:
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = Probe(nn.Sequential(nn.Linear(6, 3)), 3, None, None)
    cb = ManifoldMixupCallback(layers=["input"], probability=0.0, seed=2)
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    assert all(r["decision"] is None for r in model.records)
    torch.testing.assert_close(torch.cat([r["x"] for r in model.records]), x)
    # Unmixed batches get the mixed batches' target format: one-hot soft targets.
    one_hot = torch.nn.functional.one_hot(y, 3).float()
    torch.testing.assert_close(torch.cat([r["y"] for r in model.records]), one_hot)


class RecurrentNet(nn.Module):
    """An RNN classifier on (B, T, F) inputs; the head reads ``h_n[-1]`` plus the last step."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        time_major = not self.rnn.batch_first
        output, state = self.rnn(x.transpose(0, 1) if time_major else x)
        h_n = state[0] if isinstance(state, tuple) else state
        return h_n[-1] + (output[-1] if time_major else output[:, -1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(("kind", "num_layers"), [(nn.LSTM, 4), (nn.GRU, 4), (nn.LSTM, 2)])
def test_rnn_head_on_h_n_sees_the_exact_mix(
    kind: type[nn.RNNBase], num_layers: int, batch_first: bool, lam_mode: str
) -> None:
    # Sequence length == batch size (4), and num_layers too in most cases: h_n is (4, 4, H) and
    # a time-major output (4, 4, H), so a mix along the wrong axis keeps every shape. With 2
    # layers h_n does not have the batch size on axis 0 and must still be mixed.
    net = RecurrentNet(kind(2, 6, num_layers=num_layers, batch_first=batch_first))
    x, y = torch.randn(8, 4, 2), torch.randint(0, 3, (8,))
    model = Probe(net, 3, lambda net, x: net.features(x), "net.head")
    cb = ManifoldMixupCallback(layers=["net.rnn"], lam_mode=lam_mode, seed=4)  # type: ignore[arg-type]
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    assert len(model.records) == 2
    for rec in model.records:
        d = rec["decision"]
        assert d.layer == "net.rnn"
        torch.testing.assert_close(rec["seen"], _expected(rec["h"], d.lam, d.index))


class TimeMajorEncoder(nn.Module):
    """(B, S, F) -> logits through a time-major ``nn.TransformerEncoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.layers[0](self.embed(x).transpose(0, 1))  # (S, B, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x).transpose(0, 1)).mean(dim=0))


def test_time_major_transformer_layer_is_mixed_along_the_batch_not_time() -> None:
    x, y = torch.randn(8, 4, 2), torch.randint(0, 3, (8,))  # sequence length == batch size
    model = Probe(TimeMajorEncoder(), 3, lambda net, x: net.hidden(x), "net.encoder.layers.1")
    cb = ManifoldMixupCallback(layers=["net.encoder.layers.0"], lam_mode="sample", seed=6)
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, _loader(x, y, 4))
    for rec in model.records:
        d = rec["decision"]
        lam = d.lam.view(1, -1, 1)
        h = rec["h"]
        torch.testing.assert_close(rec["seen"], lam * h + (1 - lam) * h[:, d.index])
