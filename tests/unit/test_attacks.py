"""Attacks: the eps-box contract, the registry, seeds, and exactness on linear models.

For a linear classifier the worst case over the L-inf box intersected with [0, 1] has a closed form, so
the attacks can be checked against the true robust accuracy, not merely against each other.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from core.attacks import ATTACKS, Attack, create_attack
from core.attacks.cw import cw_margin_loss
from core.errors import ConfigError

EPS = 8 / 255
SHAPE = (3, 8, 8)
D = 3 * 8 * 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core box OpenMP's spinning threads made the
    AA test 10x slower (30 s instead of 3 s) while other jobs ran."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def linear_problem(num_classes: int, n: int, spread: float, seed: int = 0):
    """Gaussian class means around grey, a nearest-mean linear classifier, and points near their mean."""
    g = torch.Generator().manual_seed(seed)
    means = 0.5 + spread * torch.randn(num_classes, D, generator=g)
    y = torch.arange(n) % num_classes
    x = (means[y] + 0.05 * torch.randn(n, D, generator=g)).clamp(0, 1)
    linear = nn.Linear(D, num_classes)
    with torch.no_grad():
        centred = means - means.mean(0)
        linear.weight.copy_(centred)
        linear.bias.copy_(-0.5 * (centred * means).sum(1))
    return nn.Sequential(nn.Flatten(), linear), x.view(n, *SHAPE), y


def exact_robust(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per example: does every margin (w_y - w_j).x + (b_y - b_j) stay > 0 over the whole box?

    Each margin is separable, so its minimum takes, per coordinate, the box end chosen by the weight's sign;
    the point is robust iff all these minima are positive (one class j reaching 0 is enough to fool it).
    """
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    flat = x.flatten(1)
    low, high = (flat - eps).clamp(0, 1), (flat + eps).clamp(0, 1)
    robust = torch.empty(len(y), dtype=torch.bool)
    for i, label in enumerate(y.tolist()):
        v, c = weight[label] - weight, bias[label] - bias
        worst = torch.minimum(v * low[i], v * high[i]).sum(1) + c
        worst[label] = float("inf")
        robust[i] = bool((worst > 0).all())
    return robust


def accuracy(attack: Attack, x: torch.Tensor, y: torch.Tensor) -> int:
    return int(attack.run(x, y)[1].sum())


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained on 10 separable blobs: accurate on clean data, fragile at eps = 8/255."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    means = 0.5 + 0.06 * torch.randn(10, D, generator=g)
    y = torch.arange(640) % 10
    x = (means[y] + 0.05 * torch.randn(640, D, generator=g)).clamp(0, 1).view(-1, *SHAPE)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    model.train()   # attacks must switch it to eval and back
    x_test, y_test = x[:40], y[:40]
    with torch.no_grad():
        clean = int((model(x_test).argmax(1) == y_test).sum())
    assert clean >= 38
    return model, x_test, y_test, clean


FAST = {"square": {"n_queries": 1000}}   # AA's p_init 0.8 needs ~1000 queries to bite here


@pytest.mark.parametrize("name", [n for n in ATTACKS if n != "clean"])
def test_attack_contract_and_strength(name, trained_mlp):
    model, x, y, clean = trained_mlp
    surrogate = linear_problem(10, 10, spread=0.06, seed=1)[0]   # the nearest-mean rule of the same blobs
    kwargs = dict(FAST.get(name, {}), **({"surrogate": surrogate} if name == "transfer" else {}))
    attack = create_attack(name, model, EPS, seed=0, **kwargs)
    x_adv, correct = attack.run(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert int(correct.sum()) < clean, f"{name} did not lower the accuracy"
    with torch.no_grad():   # the verdict is the model's prediction on the returned points
        assert torch.equal(correct, model(x_adv).argmax(1) == y)
    assert model.training, "the model's mode must be restored"
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    if name == "transfer":
        assert all(p.grad is None and p.requires_grad for p in surrogate.parameters())


def test_registry_and_errors():
    assert set(ATTACKS) == {"clean", "fgsm", "pgd_sat", "pgd_trades", "cw_inf", "aa", "square", "transfer"}
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 10))
    with pytest.raises(ConfigError, match="pgd_sat"):
        create_attack("pgd", model, EPS)
    with pytest.raises(ConfigError, match="steps"):
        create_attack("pgd_sat", model, EPS, stpes=10)
    with pytest.raises(ConfigError, match="steps"):
        create_attack("pgd_sat", model, EPS, steps=0)
    with pytest.raises(ConfigError, match="eps"):
        create_attack("fgsm", model, 8.0)
    with pytest.raises(ConfigError, match="surrogate"):
        create_attack("transfer", model, EPS)
    with pytest.raises(ConfigError, match="source_attack"):
        create_attack("transfer", model, EPS, surrogate=model, source_attack="aa")


def test_settings_report_the_paper_protocol():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 10))
    assert create_attack("pgd_sat", model, EPS, seed=3).settings == {
        "steps": 20, "step_size": 2 / 255, "init": "uniform", "seed": 3}
    assert create_attack("pgd_trades", model, EPS).settings["step_size"] == 0.003
    assert create_attack("cw_inf", model, EPS).settings == {
        "steps": 20, "step_size": 2 / 255, "init": "uniform", "kappa": 50.0}
    assert create_attack("cw_inf", model, EPS, steps=30).settings["steps"] == 30
    assert create_attack("fgsm", model, EPS, seed=3).settings == {}
    assert create_attack("square", model, EPS).settings["n_queries"] == 5000
    aa = create_attack("aa", model, EPS).settings
    assert (aa["version"], aa["apgd_iterations"], aa["square_queries"]) == ("standard", 100, 5000)
    transfer = create_attack("transfer", model, EPS, surrogate=model, source_attack="cw_inf").settings
    assert transfer["source_attack"] == "cw_inf" and transfer["source_settings"]["kappa"] == 50.0


def test_cw_margin_loss_caps_at_kappa():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 80.0, 1.0]])
    y = torch.tensor([0, 0])
    # first row: best other 2 - true 5 = -3 (no cap); second: 80 - 0 = 80, capped at kappa
    assert cw_margin_loss(logits, y, kappa=50.0).item() == pytest.approx(-3.0 + 50.0)


def test_seeds_make_random_starts_reproducible(trained_mlp):
    model, x, y, _ = trained_mlp
    def run(**kw):
        return create_attack("pgd_sat", model, EPS, steps=2, **kw).perturb(x, y)
    assert torch.equal(run(seed=1), run(seed=1))
    assert not torch.equal(run(seed=1), run(seed=2))
    assert torch.equal(run(generator=torch.Generator().manual_seed(5)),
                       run(generator=torch.Generator().manual_seed(5)))


def test_uint8_images_are_accepted(trained_mlp):
    model, x, y, _ = trained_mlp
    x8 = (x * 255).round().to(torch.uint8)
    x_adv = create_attack("fgsm", model, EPS).perturb(x8, y)
    assert (x_adv - x8.float() / 255).abs().max() <= EPS + 1e-6


def test_binary_linear_gradient_attacks_are_exact():
    """Two logits: one margin, whose box minimum sign steps reach exactly (FGSM in one step)."""
    model, x, y = linear_problem(2, 200, spread=0.03)
    exact = int(exact_robust(model, x, y, EPS).sum())
    assert 0.3 * len(y) <= exact <= 0.7 * len(y)
    assert accuracy(create_attack("fgsm", model, EPS), x, y) == exact
    for name in ("pgd_sat", "pgd_trades", "cw_inf"):
        found = accuracy(create_attack(name, model, EPS, seed=0), x, y)
        assert exact <= found <= exact + 1, name


def test_autoattack_matches_exact_robust_accuracy_of_a_linear_model():
    """10 classes, 64 points: every attack is a lower bound on error, AA attains the exact value."""
    model, x, y = linear_problem(10, 64, spread=0.06)
    exact = int(exact_robust(model, x, y, EPS).sum())
    assert 0.3 * len(y) <= exact <= 0.7 * len(y)
    for name in ("fgsm", "pgd_sat", "pgd_trades", "cw_inf"):
        assert accuracy(create_attack(name, model, EPS, seed=0), x, y) >= exact, name
    rng_before = torch.get_rng_state()
    def tracer(frame, event, arg):   # stands in for a coverage tracer or debugger
        return None
    sys.settrace(tracer)
    try:
        aa = create_attack("aa", model, EPS)
        x_adv, correct = aa.run(x, y)
        trace_after = sys.gettrace()
    finally:
        sys.settrace(None)
    assert int(correct.sum()) == exact
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert trace_after is tracer, "pyautoattack's settrace(None) must be undone"
    assert torch.equal(torch.get_rng_state(), rng_before), "pyautoattack reseeds the global RNG"
    assert any("robust accuracy after APGD-CE" in line for line in aa.log)


def test_autoattack_with_fewer_than_ten_classes():
    model, x, y = linear_problem(5, 10, spread=0.06)
    aa = create_attack("aa", model, EPS)
    aa.run(x, y)
    assert aa.settings["apgd_t_targets"] == 4 and any("4 target" in w for w in aa.warnings)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        create_attack("aa", linear_problem(3, 3, spread=0.06)[0], EPS).run(x[:3], y[:3] % 3)


def test_transfer_from_the_model_itself_is_white_box_pgd(trained_mlp):
    model, x, y, _ = trained_mlp
    transfer = create_attack("transfer", model, EPS, surrogate=model, seed=4)
    assert torch.equal(transfer.perturb(x, y), create_attack("pgd_sat", model, EPS, seed=4).perturb(x, y))
    assert any("white-box" in w for w in transfer.warnings)
