"""AdaAD, the IGDM add-on and ABSLD: losses against hand computations, the teacher-in-the-loop attack,
the per-class temperature update and exact resume with method state."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.data import load_dataset
from core.errors import Cancelled, ConfigError
from core.methods import Batch, create_method
from core.methods.igdm import igdm_divergence, igdm_ramp
from core.models import create_model
from core.train import TrainConfig, Trainer

# ----- helpers: explicit formulas on plain Python floats ---------------------------------------------


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl_rows(target_logits: list[list[float]], student_logits: list[list[float]]) -> float:
    """sum_i sum_k p_T (log p_T - log p_S), no reduction."""
    total = 0.0
    for t_row, s_row in zip(target_logits, student_logits, strict=True):
        p, q = softmax(t_row), softmax(s_row)
        total += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    return total


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight), dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def apply(layer: nn.Linear, x: list[list[float]]) -> list[list[float]]:
    return layer(torch.tensor(x, dtype=torch.float64)).tolist()


X = [[0.2, 0.5, 0.9], [0.7, 0.1, 0.4]]
X_ADV = [[0.25, 0.45, 0.95], [0.65, 0.15, 0.35]]
TEACHER_W, TEACHER_B = [[1.0, -2.0, 0.5], [0.3, 1.5, -1.0], [-0.7, 0.2, 2.0]], [0.1, -0.2, 0.3]
STUDENT_W, STUDENT_B = [[0.5, 0.4, -0.3], [-1.0, 0.8, 0.6], [0.2, -0.5, 1.1]], [0.0, 0.2, -0.1]


def models() -> tuple[nn.Linear, nn.Linear]:
    return linear(TEACHER_W, TEACHER_B), linear(STUDENT_W, STUDENT_B)


def batch_of(teacher: nn.Module, x: list[list[float]], y: list[int] | None = None) -> Batch:
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y if y is not None else [0] * len(x))
    return Batch(x=xt, y=yt, teacher=teacher)


# ----- AdaAD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "reduction", "denominator"),
                         [(0.7, "reference", 6), (0.7, "batchmean", 2), (1.0, "reference", 6)])
def test_adaad_outer_loss_is_the_hand_computation(alpha: float, reduction: str, denominator: int) -> None:
    teacher, student = models()
    method = create_method("adaad", alpha=alpha, kl_reduction=reduction)
    batch = batch_of(teacher, X)
    x_adv = torch.tensor(X_ADV, dtype=torch.float64)
    loss, terms = method.outer(student, batch, x_adv, epoch=0)

    kl_adv = kl_rows(apply(teacher, X_ADV), apply(student, X_ADV)) / denominator
    kl_nat = kl_rows(apply(teacher, X), apply(student, X)) / denominator
    assert float(terms["kl_adv"].detach()) == pytest.approx(kl_adv, rel=1e-12)
    assert float(terms["kl_nat"].detach()) == pytest.approx(kl_nat, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(alpha * kl_adv + (1 - alpha) * kl_nat, rel=1e-12)
    assert "igdm" not in terms


class ModeRecorder(nn.Module):
    """A linear teacher that records the mode of each forward."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer, self.modes = layer, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.layer(x)


def kl_at(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return kl_rows(teacher(x).tolist(), student(x).tolist())


def test_adaad_attack_raises_the_divergence_inside_the_box() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 4, dtype=torch.float64), nn.Linear(6, 4, dtype=torch.float64)
    x = torch.rand(8, 6, dtype=torch.float64)
    eps = 0.1
    method = create_method("adaad", eps=eps, step_size=0.02, steps=10, init="none")
    x_adv = method.attack(student, batch_of(teacher, x.tolist()), epoch=0)
    assert kl_at(teacher, student, x_adv) > 1.2 * kl_at(teacher, student, x)
    assert float((x_adv - x).abs().max()) <= eps + 1e-12
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_adaad_attack_differentiates_the_teacher_and_leaves_it_as_it_was() -> None:
    teacher_layer, _ = models()
    teacher = ModeRecorder(teacher_layer)
    teacher.train()
    # A student whose output does not depend on x: any move of x_adv comes from the teacher's gradient.
    student = linear([[0.0] * 3] * 3, [0.3, -0.1, 0.2])
    method = create_method("adaad", eps=0.05, step_size=0.05, steps=1, init="none")
    batch = batch_of(teacher, X)
    x_adv = method.attack(student, batch, epoch=0)
    assert not torch.equal(x_adv, batch.x)
    assert teacher.modes and not any(teacher.modes)  # every attack forward in eval mode
    assert teacher.training  # and the caller's mode put back
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in teacher.parameters())

    x = batch.x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(batch.teacher_logits_grad(x)[:, 0].sum(), x)
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters()) and teacher.training


# ----- IGDM ------------------------------------------------------------------------------------------


def test_igdm_divergence_is_the_hand_computation() -> None:
    s_plus, s_minus = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.1]], [[0.2, 0.3, 0.1], [-0.5, 1.0, 0.4]]
    t_plus, t_minus = [[2.0, -1.0, 0.0], [0.0, 0.5, 1.5]], [[0.5, 0.5, 0.5], [1.0, -1.0, 0.0]]
    diff = [[a - b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(s_plus, s_minus, strict=True)]
    t_diff = [[a - b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(t_plus, t_minus, strict=True)]
    expected = kl_rows(t_diff, diff) / 2  # batch mean
    got = igdm_divergence(*(torch.tensor(v, dtype=torch.float64) for v in (s_plus, s_minus, t_plus, t_minus)))
    assert float(got) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["rslad", "adaad"])
def test_igdm_term_in_the_host_loss(name: str) -> None:
    teacher, student = models()
    x_adv = torch.tensor(X_ADV, dtype=torch.float64)
    base = create_method(name)
    loss0, terms0 = base.outer(student, batch_of(teacher, X), x_adv, epoch=49)
    with_igdm = create_method(name, igdm_weight=20.0)
    loss1, terms1 = with_igdm.outer(student, batch_of(teacher, X), x_adv, epoch=49)

    delta = [[a - b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(X_ADV, X, strict=True)]
    plus = [[a + d for a, d in zip(r, dr, strict=True)] for r, dr in zip(X, delta, strict=True)]
    minus = [[a - d for a, d in zip(r, dr, strict=True)] for r, dr in zip(X, delta, strict=True)]

    def difference(layer: nn.Linear) -> list[list[float]]:
        return [[a - b for a, b in zip(r1, r2, strict=True)]
                for r1, r2 in zip(apply(layer, plus), apply(layer, minus), strict=True)]

    divergence = kl_rows(difference(teacher), difference(student)) / 2
    weight = 20.0 * 50 / 200  # epoch 49 is the 50th of the 200-epoch ramp
    assert float(terms1["igdm"].detach()) == pytest.approx(divergence, rel=1e-9)
    assert float(terms1["igdm_weight"].detach()) == pytest.approx(weight)
    assert float(loss1.detach()) == pytest.approx(float(loss0.detach()) + weight * divergence, rel=1e-9)
    assert "igdm" not in terms0


def test_igdm_ramp_values() -> None:
    assert igdm_ramp(20.0, 200, 0) == pytest.approx(0.1)
    assert igdm_ramp(20.0, 200, 99) == pytest.approx(10.0)
    assert igdm_ramp(20.0, 200, 199) == pytest.approx(20.0)
    assert igdm_ramp(20.0, 200, 299) == pytest.approx(30.0)  # the code does not cap it (RSLAD: 300 epochs)
    assert igdm_ramp(0.0, 200, 150) == 0.0
    # The ramp scales with a shortened run like the milestones do.
    assert create_method("rslad", igdm_weight=1.0, epochs=30).igdm_ramp_epochs == 20
    assert create_method("adaad", epochs=20).igdm_ramp_epochs == 20
    assert create_method("adaad", epochs=20, igdm_ramp_epochs=7).igdm_ramp_epochs == 7


def test_rslad_without_igdm_is_unchanged() -> None:
    """igdm_weight = 0 computes nothing more: the loss is bit for bit RSLAD's two KL terms."""
    teacher, student = models()
    x_adv = torch.tensor(X_ADV, dtype=torch.float64)
    method = create_method("rslad")
    batch = batch_of(teacher, X)
    loss, terms = method.outer(student, batch, x_adv, epoch=10)
    p_t = torch.softmax(batch.teacher_logits(), dim=1)
    expected = (5 / 6) * method.kl(p_t, student(x_adv)) + (1 / 6) * method.kl(p_t, student(batch.x))
    assert torch.equal(loss, expected)
    assert set(terms) == {"kl_adv", "kl_nat"}
    loss_igdm, _ = create_method("rslad", igdm_weight=1.0).outer(student, batch, x_adv, epoch=10)
    assert not torch.equal(loss_igdm, expected)


@pytest.mark.parametrize("bad", [{"igdm_weight": -1.0}, {"igdm_weight": 1e6}, {"igdm_ramp_epochs": 0},
                                 {"igdm_beta": 11.0}, {"temp_rate": -0.1}])
def test_new_parameters_are_bounded(bad: dict) -> None:
    name = "absld" if "temp_rate" in bad else "adaad"
    with pytest.raises(ConfigError, match=next(iter(bad))):
        create_method(name, **bad)


def test_absld_temperature_bounds_must_hold_the_start() -> None:
    with pytest.raises(ConfigError, match="temp_min"):
        create_method("absld", temp_min=1.5)


# ----- ABSLD -----------------------------------------------------------------------------------------


def test_absld_update_lowers_the_worst_class_temperature() -> None:
    method = create_method("absld")
    method._ensure_state(4, torch.device("cpu"))
    method._loss_adv = torch.tensor([1.0, 2.0, 6.0, 3.0])  # class 2 is the hardest, class 0 the easiest
    method._loss_nat = torch.tensor([2.0, 2.0, 2.0, 2.0])  # all equal: nothing to re-balance
    method.end_epoch(0)
    # gap = L - mean = (-2, -1, 3, 0), max |gap| = 3: tau = 1 - 0.1 * gap / 3
    expected = [1 + 0.2 / 3, 1 + 0.1 / 3, 0.9, 1.0]
    assert method.state_dict()["temperature_adv"] == pytest.approx(expected, rel=1e-12)
    assert method.state_dict()["temperature_nat"] == [1.0] * 4
    assert int(torch.tensor(method.state_dict()["temperature_adv"]).argmin()) == 2

    # After the first milestone (215, 1-based) the step is 0.01; the temperatures stay in [0.5, 5].
    assert method.rate(213) == pytest.approx(0.1) and method.rate(214) == pytest.approx(0.01)
    assert method.rate(299) == pytest.approx(1e-4)
    clamped = create_method("absld", temp_min=0.95, temp_rate=0.5)
    clamped._ensure_state(4, torch.device("cpu"))
    clamped._loss_adv, clamped._loss_nat = torch.tensor([1.0, 2.0, 6.0, 3.0]), torch.zeros(4)
    clamped.end_epoch(0)
    assert clamped.state_dict()["temperature_adv"][2] == 0.95
    assert clamped.state_dict()["temperature_adv"][0] == pytest.approx(1 + 0.5 * 2 / 3)


def test_absld_soft_labels_use_the_class_temperature_and_collect_losses() -> None:
    teacher, student = models()
    method = create_method("absld")
    method.load_state_dict({"temperature_adv": [2.0, 1.0, 0.5], "temperature_nat": [1.0, 4.0, 1.0]})
    batch = batch_of(teacher, X, y=[0, 1])
    x_adv = torch.tensor(X_ADV, dtype=torch.float64)
    loss, terms = method.outer(student, batch, x_adv, epoch=0)

    t_logits = apply(teacher, X)
    adv_targets = [[v / 2.0 for v in t_logits[0]], [v / 1.0 for v in t_logits[1]]]
    nat_targets = [[v / 1.0 for v in t_logits[0]], [v / 4.0 for v in t_logits[1]]]

    def reference_kl(targets: list[list[float]], logits: list[list[float]]) -> float:
        total = 0.0
        for t_row, s_row in zip(targets, logits, strict=True):
            p, q = softmax(t_row), softmax(s_row)
            total += sum(pk * (math.log(pk + 1e-5) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
        return total / 6

    kl_adv = reference_kl(adv_targets, apply(student, X_ADV))
    kl_nat = reference_kl(nat_targets, apply(student, X))
    assert float(terms["kl_adv"].detach()) == pytest.approx(kl_adv, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(5 / 6 * kl_adv + 1 / 6 * kl_nat, rel=1e-12)
    batchmean = create_method("absld", kl_reduction="batchmean")
    batchmean.load_state_dict(method.state_dict())
    loss_bm, _ = batchmean.outer(student, batch_of(teacher, X, y=[0, 1]), x_adv, epoch=0)
    assert float(loss_bm.detach()) == pytest.approx(3 * float(loss.detach()), rel=1e-12)  # / B, not / (B x C)

    def ce(logits: list[float], label: int) -> float:
        return -math.log(softmax(logits)[label])

    s_adv = apply(student, X_ADV)
    assert method._loss_adv.tolist() == pytest.approx([ce(s_adv[0], 0), ce(s_adv[1], 1), 0.0], rel=1e-6)


def test_absld_state_round_trip() -> None:
    a = create_method("absld")
    assert a.state_dict() == {}
    state = {"temperature_adv": [0.5, 1.25, 5.0], "temperature_nat": [1.0, 0.75, 2.0]}
    a.load_state_dict(state)
    b = create_method("absld")
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == state
    b.load_state_dict({})
    assert b.state_dict() == {}


# ----- exact resume with method state ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """80 learnable 3x12x12 images in 4 classes; 16 held out for validation."""
    rng = np.random.default_rng(1)
    y = np.arange(96) % 4
    colours = rng.uniform(40, 215, size=(4, 3))
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 40, size=(96, 12, 12, 3)), 0, 255)
    path = tmp_path_factory.mktemp("absld") / "tiny.npz"
    np.savez(path, x=x[:80].astype(np.uint8), y=y[:80], x_test=x[80:].astype(np.uint8), y_test=y[80:])
    return load_dataset("npz", path, val_size=16, seed=0)


def absld_trainer(out: Path, data, *, seed: int = 0, **kw) -> Trainer:
    torch.manual_seed(1000)
    teacher = create_model("tiny_cnn", data.num_classes)
    torch.manual_seed(seed)
    student = create_model("tiny_cnn", data.num_classes)
    method = create_method("absld", steps=1, epochs=3, temp_rate=0.5)
    cfg = TrainConfig(batch_size=16, seed=0, deterministic=True, device="cpu", val_attack_steps=1)
    return Trainer(cfg, method, student, teacher, data, out, **kw)


def test_absld_resume_is_bit_identical(tmp_path: Path, data) -> None:
    full = absld_trainer(tmp_path / "a", data).fit()
    temperatures = [m["method_state"]["temperature_adv"] for m in full["history"]]
    assert len(temperatures) == 3 and temperatures[0] != [1.0] * 4 and temperatures[1] != temperatures[0]

    state = {"stop": False}

    def on_event(event: dict) -> None:
        if event["type"] == "progress" and event["epoch"] == 3 and event["step"] == 1:
            state["stop"] = True

    with pytest.raises(Cancelled):
        absld_trainer(tmp_path / "b", data, on_event=on_event, should_stop=lambda: state["stop"]).fit()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and saved["method"]["temperature_adv"] == temperatures[1]

    resumed = absld_trainer(tmp_path / "b", data, seed=5).fit()  # every weight must come from the checkpoint
    assert resumed["resumed_from"] == 2
    for name in ("student_last.pt", "student_best.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    drop = {"seconds", "train_seconds", "images_per_s"}
    assert ([{k: v for k, v in m.items() if k not in drop} for m in full["history"]]
            == [{k: v for k, v in m.items() if k not in drop} for m in resumed["history"]])


def test_checkpoint_from_before_igdm_resumes(tmp_path: Path, data) -> None:
    """An RSLAD checkpoint without the igdm_* parameters (IGDM was off) resumes; one with IGDM on does not."""

    def trainer(**kw) -> Trainer:
        torch.manual_seed(1000)
        teacher = create_model("tiny_cnn", data.num_classes)
        student = create_model("tiny_cnn", data.num_classes)
        cfg = TrainConfig(batch_size=16, seed=0, deterministic=True, device="cpu", val_attack_steps=1)
        return Trainer(cfg, create_method("rslad", steps=1, epochs=2), student, teacher, data, tmp_path, **kw)

    state = {"stop": False}

    def on_event(event: dict) -> None:
        state["stop"] = state["stop"] or (event["type"] == "progress" and event["epoch"] == 2)

    with pytest.raises(Cancelled):
        trainer(on_event=on_event, should_stop=lambda: state["stop"]).fit()
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    params = ckpt["config"]["method_params"]
    with_igdm = {**params, "igdm_weight": 1.0}
    for key in ("igdm_weight", "igdm_ramp_epochs", "igdm_beta", "igdm_gamma"):
        del params[key]
    torch.save(ckpt, path)
    assert trainer().fit()["resumed_from"] == 1

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["epoch"], ckpt["config"]["method_params"] = 1, with_igdm
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="igdm_weight"):
        trainer().fit()
