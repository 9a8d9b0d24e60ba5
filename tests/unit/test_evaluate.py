"""The evaluator: report rows, example selection, cancel, input checks, and the ordering sanity check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.errors import Cancelled, ConfigError, DataError
from core.evaluate import MAX_PER_CLASS, WORST_KEPT, check_ordering, evaluate_model, examples_fingerprint
from core.stats import decode_bits, wilson_interval

EPS = 8 / 255
D = 3 * 8 * 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; spinning OpenMP threads are slow on a shared 2-core box."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def problem():
    """A nearest-mean linear classifier on 10 Gaussian blobs: clean accuracy high, robust about half."""
    g = torch.Generator().manual_seed(0)
    means = 0.5 + 0.06 * torch.randn(10, D, generator=g)
    y = torch.arange(48) % 10
    x = (means[y] + 0.05 * torch.randn(48, D, generator=g)).clamp(0, 1).view(-1, 3, 8, 8)
    linear = nn.Linear(D, 10)
    with torch.no_grad():
        centred = means - means.mean(0)
        linear.weight.copy_(centred)
        linear.bias.copy_(-0.5 * (centred * means).sum(1))
    return nn.Sequential(nn.Flatten(), linear), x, y


def row(attack: str, accuracy: float, n: int = 100, eps: float = EPS) -> dict:
    return {"attack": attack, "accuracy": accuracy, "n": n, "eps": eps, "settings": {}, "seconds": 0.0}


def test_rows_have_the_reported_fields(problem):
    model, x, y = problem
    model.train()
    events = []
    report = evaluate_model(model, x, y, ["clean", "fgsm", "pgd_sat", "cw_inf", "aa"], batch_size=32,
                            on_progress=events.append)
    rows = {r["attack"]: r for r in report["rows"]}
    assert [r["attack"] for r in report["rows"]] == ["clean", "fgsm", "pgd_sat", "cw_inf", "aa"]
    for r in report["rows"]:
        assert set(r) == {"attack", "accuracy", "n", "correct", "ci95", "eps", "settings", "seconds",
                          "per_class", "worst_class", "examples", "correct_bits"}
        assert r["n"] == 48 and 0.0 <= r["accuracy"] <= 1.0 and r["seconds"] >= 0
        assert r["accuracy"] == r["correct"] / 48 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert sum(c["n"] for c in r["per_class"].values()) == 48
        assert sum(c["correct"] for c in r["per_class"].values()) == r["correct"]
        assert decode_bits(r["correct_bits"], 48).sum() == r["correct"]
    assert rows["clean"]["eps"] == 0.0 and rows["aa"]["eps"] == pytest.approx(EPS)
    assert rows["pgd_sat"]["settings"] == {"steps": 20, "step_size": 2 / 255, "init": "uniform", "seed": 0}
    assert rows["aa"]["accuracy"] < rows["clean"]["accuracy"]
    assert report["ordering_ok"] is True, report["warnings"]
    assert len(events) == 5 * 2 and events[-1]["fraction"] == pytest.approx(1.0)
    assert events[0] == {"type": "progress", "attack": "clean", "done": 32, "total": 48,
                         "fraction": pytest.approx(32 / 48 / 5)}
    assert model.training and all(p.grad is None for p in model.parameters())


def test_first_n_examples_uint8_and_batching_give_the_same_numbers(problem):
    model, x, y = problem
    attacks = ["clean", "pgd_trades"]
    subset = evaluate_model(model, x, y, attacks, n_examples=30, batch_size=30)
    x8 = (x * 255).round().to(torch.uint8)
    explicit = evaluate_model(model, x8[:30].float() / 255, y[:30], attacks, batch_size=30)
    as_uint8 = evaluate_model(model, x8, y, attacks, n_examples=30, batch_size=30)
    accuracies = [[r["accuracy"] for r in rep["rows"]] for rep in (subset, explicit, as_uint8)]
    assert accuracies[0] == accuracies[1] == accuracies[2]
    assert subset["rows"][0]["n"] == 30
    more = evaluate_model(model, x, y, ["clean"], n_examples=1000)
    assert more["rows"][0]["n"] == 48 and "only 48" in more["warnings"][0]


def test_transfer_uses_the_surrogate(problem):
    model, x, y = problem
    report = evaluate_model(model, x, y, ["clean", "transfer"], surrogate=model,
                            attack_kwargs={"transfer": {"source_attack": "cw_inf"}})
    transfer = report["rows"][1]
    assert transfer["settings"]["source_attack"] == "cw_inf"
    assert any("white-box" in w for w in report["warnings"])
    with pytest.raises(ConfigError, match="surrogate"):
        evaluate_model(model, x, y, ["clean", "transfer"])


def test_should_stop_cancels(problem):
    model, x, y = problem
    calls = []
    def stop_on_third_poll() -> bool:
        calls.append(1)
        return len(calls) >= 3
    with pytest.raises(Cancelled):
        evaluate_model(model, x, y, ["clean", "pgd_sat"], batch_size=20, should_stop=stop_on_third_poll)
    assert len(calls) == 3


def test_bad_inputs_fail_before_any_attack_runs(problem):
    model, x, y = problem
    with pytest.raises(ConfigError, match="pgd_sat"):
        evaluate_model(model, x, y, ["clean", "pgd"])
    with pytest.raises(ConfigError, match="twice"):
        evaluate_model(model, x, y, ["clean", "clean"])
    with pytest.raises(ConfigError, match="not being run"):
        evaluate_model(model, x, y, ["clean"], attack_kwargs={"square": {"n_queries": 10}})
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        evaluate_model(model, x * 2 - 1, y, ["clean"])
    with pytest.raises(DataError, match="labels"):
        evaluate_model(model, x, y + 10, ["clean"])
    with pytest.raises(DataError, match="one label per image"):
        evaluate_model(model, x, y[:-1], ["clean"])
    with pytest.raises(ConfigError, match="fp32"):
        evaluate_model(nn.Sequential(nn.Flatten(), nn.Linear(D, 10)).double(), x, y, ["clean"])


def test_check_ordering_allows_a_slack_of_examples():
    fgsm, one_better, two_better = (row(name, acc, n=200) for name, acc in
                                    (("fgsm", 0.215), ("pgd_sat", 0.220), ("pgd_sat", 0.225)))
    assert check_ordering([fgsm, one_better], slack_examples=1) == []
    assert len(check_ordering([fgsm, two_better], slack_examples=1)) == 1
    assert len(check_ordering([fgsm, one_better])) == 1


def test_check_ordering_flags_inversions_and_passes_a_sane_report():
    sane = [row("clean", 0.83, eps=0.0), row("fgsm", 0.58), row("pgd_sat", 0.54), row("pgd_trades", 0.56),
            row("cw_inf", 0.53), row("aa", 0.51), row("square", 0.60), row("transfer", 0.80)]
    assert check_ordering(sane) == []
    # an iterative attack doing worse than one FGSM step is the textbook sign of gradient masking
    (pgd_vs_fgsm,) = check_ordering([row("fgsm", 0.40), row("pgd_sat", 0.45)])
    assert pgd_vs_fgsm.startswith("pgd_sat") and "fgsm accuracy 40.00%" in pgd_vs_fgsm

    masked = [row("clean", 0.83, eps=0.0), row("pgd_sat", 0.54), row("aa", 0.60), row("fgsm", 0.90)]
    warnings = check_ordering(masked)
    assert len(warnings) == 2
    aa_vs_pgd = next(w for w in warnings if w.startswith("aa") and "pgd_sat" in w)
    assert "60.00%" in aa_vs_pgd and "54.00%" in aa_vs_pgd and "gradient masking" in aa_vs_pgd
    assert any(w.startswith("fgsm") and "clean" in w and "gradient masking" in w for w in warnings)
    # numbers measured on different examples are not compared
    assert check_ordering([row("pgd_sat", 0.5, n=100), row("aa", 0.6, n=50)]) == []
    assert check_ordering([row("pgd_sat", 0.5), row("aa", 0.505)], tolerance=0.01) == []


class TwoClassLinear(nn.Module):
    """Logits (0, 1) for every input: always answers class 1, so it is wrong on class 0, right on class 1."""

    def __init__(self, num_classes: int = 2, answer: int = 1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[answer] = 1.0
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + self.scale * x.flatten(1).sum(1, keepdim=True)


def test_per_class_worst_class_and_bits_on_a_crafted_model():
    x = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1, 1])  # 3 of class 0, 7 of class 1
    report = evaluate_model(TwoClassLinear(), x, y, ["clean"], batch_size=4)
    r = report["rows"][0]
    assert r["per_class"] == {"0": {"accuracy": 0.0, "n": 3, "correct": 0},
                              "1": {"accuracy": 1.0, "n": 7, "correct": 7}}
    assert r["worst_class"] == {"class": 0, "accuracy": 0.0, "n": 3, "correct": 0,
                                "ci95": [round(v, 6) for v in wilson_interval(0, 3)]}
    assert decode_bits(r["correct_bits"], 10).tolist() == (y == 1).tolist()
    assert r["examples"] == {"n": 10, "sha256": examples_fingerprint(x, y),
                             "order": "the first n examples of the test split, in order"}
    assert r["ci95"] == [round(v, 6) for v in wilson_interval(7, 10)]


def test_fingerprint_tells_other_examples_labels_and_order_apart():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 3, 4, 4, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])
    base = examples_fingerprint(x, y)
    assert examples_fingerprint(x.clone(), y.clone()) == base
    assert examples_fingerprint(x[[1, 0, 2, 3, 4, 5]], y[[1, 0, 2, 3, 4, 5]]) != base
    assert examples_fingerprint(x, 1 - y) != base
    assert examples_fingerprint(x[:5], y[:5]) != base
    changed = x.clone()
    changed[3, 0, 0, 0] += 1e-3
    assert examples_fingerprint(changed, y) != base


def test_per_class_is_bounded_for_many_classes():
    classes = MAX_PER_CLASS + 5
    y = torch.arange(classes) % classes
    x = torch.rand(classes, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    report = evaluate_model(TwoClassLinear(classes, answer=7), x, y, ["clean"], batch_size=512)
    r = report["rows"][0]
    assert len(r["per_class"]) == WORST_KEPT and str(classes) in r["per_class_note"]
    assert "7" not in r["per_class"] and all(c["accuracy"] == 0.0 for c in r["per_class"].values())
    assert r["worst_class"]["class"] == 0 and r["correct"] == 1
    small = evaluate_model(TwoClassLinear(10, answer=7), x[:10], y[:10], ["clean"])["rows"][0]
    assert len(small["per_class"]) == 10 and "per_class_note" not in small
