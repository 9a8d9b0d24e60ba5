"""core.methods: every loss checked against a hand computation on a 2-feature, 3-class linear model.

The expected values are written out with plain tensor ops (no call into core.methods), with one
attack step so the adversarial point is computable by hand: for a linear model z = x W^T + b, the
input gradient of a loss whose logit gradient is G (B x C) is G @ W.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.methods import METHODS, Batch, create_method, list_methods

DT = torch.float64
X = torch.tensor([[0.2, 0.7], [0.5, 0.5], [0.9, 0.1], [0.0, 1.0]], dtype=DT)
Y = torch.tensor([0, 1, 2, 1])
W_S = torch.tensor([[2.0, -1.0], [-1.0, 1.5], [0.5, -2.0]], dtype=DT)
B_S = torch.tensor([0.1, -0.2, 0.0], dtype=DT)
W_T = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, -1.0]], dtype=DT)
B_T = torch.tensor([0.0, 0.1, -0.1], dtype=DT)
ONEHOT = torch.eye(3, dtype=DT)[Y]
ROWS = torch.arange(4)


def linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    m = nn.Linear(2, 3).to(DT)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    return m


def student() -> nn.Linear:
    return linear(W_S, B_S)


def teacher() -> nn.Linear:
    return linear(W_T, B_T)


# ----- hand computations (plain ops only) --------------------------------------------------------------

def z_s(x: torch.Tensor) -> torch.Tensor:
    return x @ W_S.T + B_S


def z_t(x: torch.Tensor) -> torch.Tensor:
    return x @ W_T.T + B_T


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    return z - z.logsumexp(dim=1, keepdim=True)


def softmax(z: torch.Tensor) -> torch.Tensor:
    return log_softmax(z).exp()


def ce(z: torch.Tensor) -> torch.Tensor:
    return -log_softmax(z)[ROWS, Y].mean()


def pgd_step(x0: torch.Tensor, x_cur: torch.Tensor, logit_grad: torch.Tensor, step: float,
             eps: float) -> torch.Tensor:
    """One signed ascent step on the linear student, projected on the eps box around x0 and on [0, 1]."""
    x_new = x_cur + step * torch.sign(logit_grad @ W_S)
    return torch.min(torch.max(x_new, x0 - eps), x0 + eps).clamp(0.0, 1.0)


def ce_step(x_cur: torch.Tensor, step: float, eps: float) -> torch.Tensor:
    return pgd_step(X, x_cur, softmax(z_s(x_cur)) - ONEHOT, step, eps)


STEP, EPS = 0.05, 0.03  # step > eps so the projection acts; X holds 0s and 1s so the [0, 1] clip acts


def run(method, batch: Batch, epoch: int = 0):
    s = student()
    loss, logs = method.loss(s, batch, epoch=epoch)
    return loss, logs, method.attack(student(), batch, epoch=epoch)


# ----- each method against its hand computation ---------------------------------------------------------

def test_natural_is_clean_cross_entropy():
    loss, logs, x_adv = run(create_method("natural"), Batch(X, Y))
    assert x_adv is None
    assert torch.allclose(loss, ce(z_s(X)))
    assert logs["loss"] == pytest.approx(float(ce(z_s(X))))


def test_sat_one_step_and_loss():
    m = create_method("sat", steps=1, init="none", step_size=STEP, eps=EPS)
    loss, _, x_adv = run(m, Batch(X, Y))
    expected_x = ce_step(X, STEP, EPS)
    assert torch.allclose(x_adv, expected_x)
    assert torch.allclose(loss, ce(z_s(expected_x)))


def test_trades_one_step_from_normal_start_and_loss():
    m = create_method("trades", steps=1, step_size=STEP, eps=EPS, beta=2.0)
    batch = Batch(X, Y, generator=torch.Generator().manual_seed(3))
    x_adv = m.attack(student(), batch, epoch=0)
    x_start = X + 0.001 * torch.randn(X.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    p_nat = softmax(z_s(X))
    expected_x = pgd_step(X, x_start, softmax(z_s(x_start)) - p_nat, STEP, EPS)
    assert torch.allclose(x_adv, expected_x)

    m0 = create_method("trades", steps=0, init="none", beta=2.0)  # x_adv = x: the KL term vanishes
    loss0, logs0 = m0.loss(student(), Batch(X, Y), epoch=0)
    assert torch.allclose(loss0, ce(z_s(X)))
    assert logs0["kl_adv"] == pytest.approx(0.0, abs=1e-12)

    loss, logs = m.loss(student(), Batch(X, Y, generator=torch.Generator().manual_seed(3)), epoch=0)
    kl = (p_nat * (log_softmax(z_s(X)) - log_softmax(z_s(expected_x)))).sum() / 4
    assert torch.allclose(loss, ce(z_s(X)) + 2.0 * kl)
    assert logs["kl_adv"] == pytest.approx(float(kl))


def test_mart_one_step_and_loss():
    m = create_method("mart", steps=1, init="none", step_size=STEP, eps=EPS, beta=5.0)
    loss, _, x_adv = run(m, Batch(X, Y))
    xa = ce_step(X, STEP, EPS)
    assert torch.allclose(x_adv, xa)
    p_adv, p_nat = softmax(z_s(xa)), softmax(z_s(X))
    wrong = [[k for k in range(3) if k != int(Y[i])] for i in range(4)]
    best_wrong = torch.tensor([max(ks, key=lambda k, i=i: float(p_adv[i, k])) for i, ks in enumerate(wrong)])
    bce = ce(z_s(xa)) - torch.log(1.0001 - p_adv[ROWS, best_wrong] + 1e-12).mean()
    kl_rows = (p_nat * (torch.log(p_nat) - torch.log(p_adv + 1e-12))).sum(dim=1)
    expected = bce + 5.0 * (kl_rows * (1.0000001 - p_nat[ROWS, Y])).mean()
    assert torch.allclose(loss, expected)


def test_ard_one_step_and_elementwise_mean_kl():
    m = create_method("ard", steps=1, init="none", step_size=STEP, eps=EPS, temperature=4.0, alpha=0.7)
    loss, logs, x_adv = run(m, Batch(X, Y, teacher()))
    xa = ce_step(X, STEP, EPS)
    assert torch.allclose(x_adv, xa)
    p_t = softmax(z_t(X) / 4.0)
    kl = (p_t * (torch.log(p_t) - log_softmax(z_s(xa) / 4.0))).sum() / (4 * 3)  # mean over B x C
    assert torch.allclose(loss, 0.7 * 16.0 * kl + 0.3 * ce(z_s(X)))
    assert logs["kl_adv"] == pytest.approx(float(kl))


def test_iad_before_and_after_warmup():
    m = create_method("iad", steps=1, init="none", step_size=STEP, eps=EPS, temperature=2.0, alpha=0.8,
                      beta=0.5, warmup_epochs=5)
    xa = ce_step(X, STEP, EPS)
    p_t = softmax(z_t(X) / 2.0)
    kl_teacher = (p_t * (torch.log(p_t) - log_softmax(z_s(xa) / 2.0))).sum() / 4  # batch mean
    ard_part = 0.8 * 4.0 * kl_teacher + 0.2 * ce(z_s(X))

    before, logs_before, x_adv = run(m, Batch(X, Y, teacher()), epoch=4)
    assert torch.allclose(x_adv, xa)
    assert torch.allclose(before, ard_part)
    assert "kl_self" not in logs_before

    after, _ = m.loss(student(), Batch(X, Y, teacher()), epoch=5)
    w = softmax(z_t(xa))[ROWS, Y] ** 0.5
    p_nat = softmax(z_s(X))
    kl_self = ((1 - w) * (p_nat * (torch.log(p_nat) - log_softmax(z_s(xa)))).sum(dim=1)).mean()
    assert torch.allclose(after, ard_part + 0.8 * kl_self)


def rslad_reference_kl(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p + 1e-5) - log_softmax(z))).mean()  # mean over B x C, 1e-5 inside log p_T


def test_rslad_one_step_and_loss():
    m = create_method("rslad", steps=1, init="none", step_size=STEP, eps=EPS)
    loss, logs, x_adv = run(m, Batch(X, Y, teacher()))
    p_t = softmax(z_t(X))
    xa = pgd_step(X, X, softmax(z_s(X)) - p_t, STEP, EPS)
    assert torch.allclose(x_adv, xa)
    expected = 5 / 6 * rslad_reference_kl(p_t, z_s(xa)) + 1 / 6 * rslad_reference_kl(p_t, z_s(X))
    assert torch.allclose(loss, expected)
    assert logs["kl_adv"] == pytest.approx(float(rslad_reference_kl(p_t, z_s(xa))))

    batchmean, _ = create_method("rslad", steps=1, init="none", step_size=STEP, eps=EPS,
                                 kl_reduction="batchmean").loss(student(), Batch(X, Y, teacher()), epoch=0)
    assert torch.allclose(batchmean, 3 * expected)  # batch mean = C x element mean
    scaled, _ = create_method("rslad", steps=1, init="none", step_size=STEP, eps=EPS,
                              kl_scale=10.0).loss(student(), Batch(X, Y, teacher()), epoch=0)
    assert torch.allclose(scaled, 10 * expected)


def test_rslad_adversarial_soft_labels_follow_the_iterate():
    m = create_method("rslad", steps=2, init="none", step_size=0.02, eps=EPS, soft_labels="adversarial")
    loss, _, x_adv = run(m, Batch(X, Y, teacher()))
    x1 = pgd_step(X, X, softmax(z_s(X)) - softmax(z_t(X)), 0.02, EPS)
    x2 = pgd_step(X, x1, softmax(z_s(x1)) - softmax(z_t(x1)), 0.02, EPS)
    assert torch.allclose(x_adv, x2)
    p_adv = softmax(z_t(x2))
    expected = 5 / 6 * rslad_reference_kl(p_adv, z_s(x2)) + 1 / 6 * rslad_reference_kl(p_adv, z_s(X))
    assert torch.allclose(loss, expected)


def test_rslad_per_term_soft_labels():
    m = create_method("rslad", steps=1, init="none", step_size=STEP, eps=EPS, soft_labels_nat="adversarial")
    loss, _, _ = run(m, Batch(X, Y, teacher()))
    p_t = softmax(z_t(X))
    xa = pgd_step(X, X, softmax(z_s(X)) - p_t, STEP, EPS)
    expected = 5 / 6 * rslad_reference_kl(p_t, z_s(xa)) + 1 / 6 * rslad_reference_kl(softmax(z_t(xa)), z_s(X))
    assert torch.allclose(loss, expected)


def test_rslad_smooth_labels_need_no_teacher():
    m = create_method("rslad", steps=1, init="none", step_size=STEP, eps=EPS, label_source="smooth",
                      smoothing=0.1)
    assert not m.needs_teacher
    loss, _, x_adv = run(m, Batch(X, Y))
    q = 0.9 * ONEHOT + 0.1 / 3
    xa = pgd_step(X, X, softmax(z_s(X)) - q, STEP, EPS)
    assert torch.allclose(x_adv, xa)
    expected = 5 / 6 * rslad_reference_kl(q, z_s(xa)) + 1 / 6 * rslad_reference_kl(q, z_s(X))
    assert torch.allclose(loss, expected)
    nsl = create_method("rslad", label_source="non_robust_teacher")
    assert nsl.needs_teacher and nsl.label_source == "non_robust_teacher"


def test_rslad_is_zero_when_student_is_teacher_and_x_adv_is_x():
    s = student()
    loss, _ = create_method("rslad", steps=0, init="none").loss(s, Batch(X, Y, s), epoch=0)
    p = softmax(z_s(X))
    assert torch.allclose(loss, (p * (torch.log(p + 1e-5) - torch.log(p))).mean())
    assert 0 < float(loss.detach()) < 1e-4  # only the 1e-5 inside the log remains


def test_rslad_never_uses_the_labels():
    m = create_method("rslad", steps=3)
    batches = [Batch(X, y, teacher(), generator=torch.Generator().manual_seed(0))
               for y in (Y, torch.tensor([2, 2, 0, 0]))]
    losses = [m.loss(student(), batch, epoch=0)[0] for batch in batches]
    assert torch.equal(losses[0], losses[1])


# ----- properties shared by all methods --------------------------------------------------------------

ADVERSARIAL = [name for name in METHODS if name != "natural"]


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_examples_stay_in_the_box(name):
    x = torch.rand(16, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    x[:4] = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=DT)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    m = create_method(name)
    x_adv = m.attack(student(), Batch(x, y, teacher(), generator=torch.Generator().manual_seed(4)), epoch=0)
    assert (x_adv - x).abs().max() <= m.eps + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_reach_the_student_only(name):
    s, t = student(), teacher()
    m = create_method(name, steps=2) if name != "natural" else create_method(name)
    batch = Batch(X, Y, t)
    m.attack(s, batch, epoch=100)
    assert all(p.grad is None for p in [*s.parameters(), *t.parameters()])  # the attack alone: no grads
    loss, logs = m.loss(s, batch, epoch=100)  # epoch 100: IAD's self-distillation term is on
    assert all(p.grad is None for p in [*s.parameters(), *t.parameters()])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert isinstance(logs["loss"], float) and all(isinstance(v, float) for v in logs.values())
    assert s.training


class ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = student()
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.inner(x)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_attack_mode(name):
    s = ModeRecorder()
    m = create_method(name, steps=3)
    m.loss(s, Batch(X, Y, teacher()), epoch=0)
    n_outer = 1 if name == "sat" else 2  # SAT's outer loss needs only S(x_adv)
    attack_modes, outer_modes = s.modes[:-n_outer], s.modes[-n_outer:]
    expected = name in ("ard", "iad")  # the ARD/IAD reference attacks a train-mode student
    assert attack_modes and all(mode is expected for mode in attack_modes)
    assert outer_modes == [True] * n_outer and s.training


@pytest.mark.parametrize("name", ["ard", "iad", "rslad"])
def test_missing_teacher_is_a_config_error(name):
    with pytest.raises(ConfigError, match="teacher"):
        create_method(name).loss(student(), Batch(X, Y), epoch=0)


def test_teacher_forward_is_shared_and_cached():
    t = teacher()
    t.train()
    calls: list[bool] = []
    t.register_forward_hook(lambda mod, _inp, _out: calls.append(mod.training))
    batch = Batch(X, Y, t)
    m = create_method("rslad", steps=2)
    m.loss(student(), batch, epoch=0)
    m.loss(student(), batch, epoch=0)
    assert calls == [False]  # one forward for two students, in eval mode
    assert t.training  # the teacher's own mode is restored
    batch.teacher_logits_on(X)
    batch.teacher_logits_on(X)
    assert len(calls) == 3  # not cached
    assert batch.teacher_logits().dtype == torch.float64 and not batch.teacher_logits().requires_grad


def test_autocast_wraps_the_forwards():
    entered: list[int] = []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        yield

    create_method("rslad", steps=2).loss(student(), Batch(X, Y, teacher(), autocast=counting), epoch=0)
    assert len(entered) >= 4  # teacher, attack, two outer forwards


# ----- configuration ----------------------------------------------------------------------------------

REFERENCE_DEFAULTS = {
    "natural": {"epochs": 100, "milestones": (75, 90)},
    "sat": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform", "epochs": 100,
            "milestones": (75, 90)},
    "trades": {"eps": 0.031, "step_size": 0.007, "steps": 10, "init": "normal", "beta": 6.0, "epochs": 100,
               "milestones": (75, 90)},
    "mart": {"eps": 8 / 255, "step_size": 0.007, "steps": 10, "init": "normal", "beta": 6.0, "epochs": 100,
             "milestones": (75, 90)},
    "ard": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform", "temperature": 30.0,
            "alpha": 1.0, "kl_reduction": "reference", "epochs": 200, "milestones": (100, 150),
            "lr_schedule": "reference"},
    "iad": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "uniform", "temperature": 1.0,
            "alpha": 1.0, "beta": 0.1, "warmup_epochs": 60, "epochs": 200, "milestones": (100, 150),
            "lr_schedule": "reference"},
    "rslad": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal", "adv_weight": 5 / 6,
              "nat_weight": 1 / 6, "temperature": 1.0, "kl_reduction": "reference", "kl_scale": 1.0,
              "soft_labels": "natural", "soft_labels_inner": None, "soft_labels_adv": None,
              "soft_labels_nat": None, "label_source": "teacher", "smoothing": 0.1,
              "igdm_weight": 0.0, "igdm_ramp_epochs": 200, "igdm_beta": 1.0, "igdm_gamma": 1.0, "epochs": 300,
              "milestones": (215, 260, 285)},
    "adaad": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal", "alpha": 1.0,
              "kl_reduction": "reference", "igdm_weight": 0.0, "igdm_ramp_epochs": 200, "igdm_beta": 1.0,
              "igdm_gamma": 1.0, "epochs": 200, "milestones": (100, 150), "weight_decay": 5e-4},
    "absld": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "init": "normal", "adv_weight": 5 / 6,
              "nat_weight": 1 / 6, "kl_reduction": "reference", "temp_rate": 0.1, "temp_min": 0.5,
              "temp_max": 5.0, "epochs": 300,
              "milestones": (215, 260, 285)},
}


def test_defaults_are_the_reference_values():
    assert set(METHODS) == set(REFERENCE_DEFAULTS)
    for name, expected in REFERENCE_DEFAULTS.items():
        optimizer = {"lr": None, "momentum": 0.9, "weight_decay": 2e-4}  # shared unless a method sets its own
        assert create_method(name).params == {**optimizer, **expected}, name
    assert METHODS["rslad"].needs_teacher and METHODS["ard"].needs_teacher and METHODS["iad"].needs_teacher
    assert not any(METHODS[n].needs_teacher for n in ("natural", "sat", "trades", "mart"))


def test_overrides():
    m = create_method("rslad", steps=5, kl_scale=10, milestones=[100, 200], eps=0.0)
    assert (m.steps, m.kl_scale, m.milestones, m.eps) == (5, 10.0, (100, 200), 0.0)
    assert isinstance(m.kl_scale, float)
    assert create_method("mart", beta=5).beta == 5.0
    assert create_method("sat", steps=7.0).steps == 7
    assert METHODS["rslad"].defaults["steps"] == 10  # class defaults untouched


@pytest.mark.parametrize("name, overrides", [
    ("rslad", {"bogus": 1}),
    ("rslad", {"eps": -0.1}),
    ("rslad", {"eps": 2.0}),
    ("sat", {"eps": True}),
    ("sat", {"eps": "0.03"}),
    ("sat", {"eps": math.nan}),
    ("sat", {"steps": -1}),
    ("sat", {"steps": 1.5}),
    ("sat", {"epochs": 0}),
    ("trades", {"beta": -1.0}),
    ("rslad", {"adv_weight": -0.1}),
    ("ard", {"temperature": 0.0}),
    ("ard", {"alpha": 1.5}),
    ("natural", {"milestones": (90, 75)}),
    ("natural", {"milestones": (0, 75)}),
    ("natural", {"epochs": 50, "milestones": (75,)}),
    ("natural", {"eps": 0.1}),
    ("sat", {"init": "gaussian"}),
    ("rslad", {"kl_reduction": "sum"}),
    ("rslad", {"soft_labels": "teacher"}),
    ("rslad", {"label_source": "smooth", "soft_labels_adv": "adversarial"}),
    ("iad", {"warmup_epochs": -1}),
])
def test_bad_overrides_are_config_errors(name, overrides):
    with pytest.raises(ConfigError):
        create_method(name, **overrides)


def test_unknown_names_list_what_is_allowed():
    with pytest.raises(ConfigError, match="step_size") as err:
        create_method("sat", stepsize=0.1)
    assert "stepsize" in str(err.value)
    with pytest.raises(ConfigError, match="rslad") as err:
        create_method("rsald")
    assert "trades" in str(err.value)


def test_milestones_scale_with_epochs():
    m = create_method("rslad", epochs=30)
    assert m.milestones == (22, 26, 29)
    assert create_method("rslad").scaled_milestones(30) == (22, 26, 29)
    for epochs in (1, 2, 3, 7, 30, 150, 600):
        ms = create_method("rslad", epochs=epochs).milestones
        assert all(1 <= a < b < epochs for a, b in zip(ms, ms[1:], strict=False))
        assert all(1 <= a < epochs for a in ms)
        assert all(abs(a - d * epochs / 300) <= 1 for a, d in zip(ms, (215, 260, 285), strict=False))
    assert create_method("ard", epochs=20).milestones == (10, 15)
    assert create_method("iad", epochs=20).warmup_epochs == 6
    assert create_method("iad", epochs=20, warmup_epochs=3).warmup_epochs == 3
    assert create_method("sat", epochs=50, milestones=(10,)).scaled_milestones(50) == (10,)
    with pytest.raises(ConfigError):
        create_method("sat", milestones=(60,)).scaled_milestones(50)


def test_describe_is_json_ready():
    described = {d["name"]: d for d in list_methods()}
    assert set(described) == set(METHODS)
    assert described["rslad"]["needs_teacher"] is True
    assert described["rslad"]["defaults"]["milestones"] == [215, 260, 285]
    assert "adversarial" in described["rslad"]["choices"]["soft_labels"]
    json.dumps(described)
