"""Recipes (core/recipes.py): what each budget resolves to, that explicit settings win, that 'reference'
at the reference budget is exactly the methods' defaults, and that the report, the CLI and the service
carry the recipe. Also the eps-scaled steps of training and evaluation attacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from core.attacks import create_attack
from core.config import DistillConfig
from core.errors import ConfigError
from core.methods import METHODS, create_method
from core.models import create_model
from core.recipes import AUTO_RULES, KL_BATCHMEAN_BELOW_EPOCHS, describe_recipes, recipe_record

EPS2, EPS8 = 2 / 255, 8 / 255


def config(method: str, **kw) -> DistillConfig:
    return DistillConfig(method=method, teacher_path="t.pt", **kw)


# ----------------------------------------------------------------------------- resolution by budget


@pytest.mark.parametrize("epochs", [5, 15, 300])
@pytest.mark.parametrize("batch_size", [32, 128, 512])
@pytest.mark.parametrize("eps", [EPS2, EPS8])
def test_auto_resolves_by_budget(epochs: int, batch_size: int, eps: float) -> None:
    short = epochs < KL_BATCHMEAN_BELOW_EPOCHS
    for name in ("rslad", "adaad", "absld"):
        cfg = config(name, epochs=epochs, batch_size=batch_size, eps=eps)
        method = cfg.build_method()
        assert method.kl_reduction == ("batchmean" if short else "reference"), (name, epochs)
        assert method.step_size == pytest.approx(eps / 4, rel=1e-12)  # 2/255 per 8/255
        record = recipe_record("auto", method, cfg.budget(), {}, None, None)
        kl = record["values"]["kl_reduction"]
        assert kl["source"] == ("recipe" if short else "reference") and kl["why"]
        # with the C-times larger batchmean gradient, auto halves the linear rule's lr
        assert record["values"]["lr"]["value"] == pytest.approx((0.05 if short else 0.1) * batch_size / 128)
        assert record["values"]["lr"]["source"] == ("recipe" if short else "reference")
        assert method.lr == (pytest.approx(0.05 * batch_size / 128) if short else None)
        # 'reference' never changes the KL, whatever the budget
        ref = config(name, epochs=epochs, batch_size=batch_size, eps=eps, recipe="reference").build_method()
        assert ref.kl_reduction == "reference"
    # nothing in auto touches them (ARD: its tempered KL collapsed under batchmean in the recipe study)
    for name in ("sat", "trades", "mart", "iad", "natural", "ard"):
        auto = config(name, epochs=epochs, batch_size=batch_size, eps=eps).build_method()
        ref = config(name, epochs=epochs, batch_size=batch_size, eps=eps, recipe="reference").build_method()
        assert auto.params == ref.params, name


def test_explicit_settings_win_over_the_recipe() -> None:
    cfg = config("rslad", epochs=15, method_params={"kl_reduction": "reference", "step_size": 0.01})
    method = cfg.build_method()
    assert method.kl_reduction == "reference" and method.step_size == 0.01
    values = recipe_record("auto", method, cfg.budget(), cfg.method_params, 0.05, 2)["values"]
    assert values["kl_reduction"]["source"] == "user" and values["step_size"]["source"] == "user"
    assert values["lr"] == {"value": 0.05, "why": "job-level lr", "source": "user"}
    # a job-level lr keeps the recipe's lr away; so does the method's own
    assert config("rslad", epochs=15, lr=0.2).build_method().lr is None
    assert config("rslad", epochs=15, method_params={"lr": 0.3}).build_method().lr == 0.3
    assert config("rslad", epochs=15).build_method().lr == pytest.approx(0.05)
    assert values["warmup_epochs"]["value"] == 2
    # an explicit step wins over the eps scaling too
    assert config("sat", eps=EPS2, method_params={"step_size": 0.01}).build_method().step_size == 0.01


def test_rules_follow_declared_parameters_not_names() -> None:
    """A method with a B x C mean KL that can be switched to batchmean gets the rule, whatever its name."""
    kl_methods = {name for name, cls in METHODS.items() if any(r.applies(cls) for r in AUTO_RULES)}
    assert kl_methods == {"rslad", "adaad", "absld"}
    assert not kl_methods & {"sat", "trades", "mart", "natural", "iad", "ard"}
    table = {row["method"]: row for row in describe_recipes(METHODS)}
    assert table["rslad"]["auto_at_epochs"] == {"15": {"kl_reduction": "batchmean", "lr": 0.05},
                                               "300": {"kl_reduction": "reference", "lr": None}}
    assert table["sat"]["auto_rules"] == []


def test_reference_at_the_reference_budget_is_todays_defaults() -> None:
    for name, cls in METHODS.items():
        defaults = create_method(name).params
        for recipe in ("reference", "auto"):  # auto changes nothing at the full schedule
            assert config(name, recipe=recipe).build_method().params == defaults, (name, recipe)
        if cls.defaults.get("eps") == EPS8:  # eps 8/255 given explicitly: bit-identical steps
            assert config(name, eps=EPS8, recipe="reference").build_method().params == defaults, name
    # TRADES writes 8/255 as 0.031: a job at 8/255 keeps its 0.007 step exactly
    assert config("trades", eps=EPS8).build_method().step_size == 0.007


def test_step_sizes_keep_the_reference_ratio() -> None:
    assert config("sat", eps=EPS2).build_method().step_size == 0.5 / 255
    assert config("mart", eps=EPS2).build_method().step_size == pytest.approx(0.007 / 4)
    assert config("trades", eps=EPS2).build_method().step_size == pytest.approx(0.007 * EPS2 / 0.031)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    for name, step in (("pgd_sat", 2 / 255), ("pgd_trades", 0.003), ("cw_inf", 2 / 255)):
        assert create_attack(name, model, EPS8).settings["step_size"] == step  # exactly, at 8/255
        assert create_attack(name, model, EPS2).settings["step_size"] == pytest.approx(step / 4)
        assert create_attack(name, model, EPS2, step_size=0.01).settings["step_size"] == 0.01
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    default = create_attack("pgd_trades", model, EPS8, seed=3).perturb(x, y)
    explicit = create_attack("pgd_trades", model, EPS8, seed=3, step_size=0.003, steps=20).perturb(x, y)
    assert torch.equal(default, explicit)


def test_bad_recipe_and_optimiser_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="recipe"):
        config("sat", recipe="fast").validate()
    with pytest.raises(ConfigError, match=r"students\[0\]: recipe must be one of auto, reference, got 'x'"):
        config("sat", students=[{"student": "tiny_cnn", "method": "sat", "recipe": "x"}]).validate()
    with pytest.raises(ConfigError, match="teacher_precision"):
        config("sat", teacher_precision="fp16").validate()
    for bad in ({"lr": 0}, {"lr": 11.0}, {"lr": "0.1"}, {"momentum": 1.5}, {"weight_decay": -1e-4},
                {"weight_decay": 1.0}, {"lr_schedule": "cosine"}):
        with pytest.raises(ConfigError):
            create_method("ard", **bad)


def test_mart_resnet18_reference_is_reproducible() -> None:
    m = create_method("mart", lr=0.01, weight_decay=3.5e-3, beta=5)
    assert (m.lr, m.weight_decay, m.momentum, m.beta) == (0.01, 3.5e-3, 0.9, 5.0)


# ----------------------------------------------------------------------------- the report and the CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recipe")
    rng = np.random.default_rng(2)
    y = np.arange(48) % 2
    x = rng.normal(80 + 100 * y[:, None, None, None], 30, size=(48, 8, 8, 3))
    x = np.clip(x, 0, 255).astype(np.uint8)
    np.savez(root / "two.npz", x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:])
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", 2).state_dict(), root / "teacher.pt")
    return root / "two.npz", root / "teacher.pt"


def test_recipe_and_steps_in_the_report(files: tuple[Path, Path], tmp_path: Path) -> None:
    """One pass, two RSLAD students at 1 epoch and eps 2/255, one per recipe: each report names its
    recipe and why; training and evaluation steps follow eps."""
    from core.cli import main

    npz, teacher = files
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(teacher), "--teacher-arch", "tiny_cnn", "--student", "tiny_cnn",
                 "--method", "rslad", "--method-param", "steps=1", "--dataset", "npz",
                 "--data-root", str(npz),
                 "--epochs", "1", "--batch-size", "16", "--eps", "2/255", "--val-size", "8",
                 "--attacks", "clean,pgd_sat,pgd_trades", "--n-eval", "8", "--device", "cpu",
                 "--allow-degenerate", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    recipe = report["recipe"]
    assert recipe["name"] == "auto" and recipe["budget"]["epochs"] == 1
    assert recipe["values"]["kl_reduction"]["value"] == "batchmean"
    assert recipe["values"]["kl_reduction"]["source"] == "recipe" and "15 epochs" in recipe["values"][
        "kl_reduction"]["why"]
    assert report["train_config"]["method_params"]["step_size"] == 0.5 / 255
    assert report["train_config"]["method_params"]["kl_reduction"] == "batchmean"
    steps = {row["attack"]: row["settings"].get("step_size") for row in report["final"]["last"]["rows"]}
    assert steps["pgd_sat"] == 0.5 / 255 and steps["pgd_trades"] == pytest.approx(0.003 / 4)
    assert report["config"]["recipe"] == "auto"
    assert "- recipe auto: kl_reduction = batchmean (recipe: " in (out / "model_card.md").read_text()

    from core.pipeline import run_distillation

    cfg = DistillConfig(teacher_path=str(teacher), teacher_arch="tiny_cnn", dataset="npz", data_root=str(npz),
                        epochs=1, batch_size=16, eps=EPS2, val_size=8, attacks=["clean"], n_eval=8,
                        device="cpu", allow_degenerate=True, exports=[],
                        students=[{"student": "tiny_cnn", "method": "rslad", "name": "auto",
                                   "method_params": {"steps": 1}},
                                  {"student": "tiny_cnn", "method": "rslad", "name": "ref",
                                   "recipe": "reference", "method_params": {"steps": 1}}])
    multi = run_distillation(cfg, tmp_path / "multi")["students"]
    assert multi["auto"]["recipe"]["values"]["kl_reduction"]["value"] == "batchmean"
    assert multi["ref"]["recipe"]["name"] == "reference"
    assert multi["ref"]["recipe"]["values"]["kl_reduction"] == {
        "value": "reference", "why": "the reference's value (recipe 'reference')", "source": "reference"}


# ----------------------------------------------------------------------------- the service and the client


def test_client_model_has_the_fields() -> None:
    from distill_client.models import JobCreate, StudentSpec

    job = JobCreate(dataset="cifar10-partial", recipe="reference", teacher_precision="fp32")
    assert (job.recipe, job.teacher_precision) == ("reference", "fp32")
    assert JobCreate(dataset="d").recipe == "auto"
    assert StudentSpec(student="tiny_cnn", method="sat", recipe="reference").recipe == "reference"
    with pytest.raises(ValueError):
        JobCreate(dataset="d", recipe="fast")


def test_service_accepts_a_recipe_and_rejects_a_bad_one(tmp_path: Path) -> None:
    from api.app import create_app
    from service.auth import create_api_key
    from service.settings import Settings

    data = tmp_path / "data"
    (data / "cifar-10-batches-py-partial").mkdir(parents=True)
    (data / "cifar-10-batches-py-partial" / "batches.meta").write_bytes(b"x")
    enqueued: list[str] = []
    app = create_app(Settings(var_dir=tmp_path / "var", data_root=data), enqueue=enqueued.append,
                     revoke=lambda job_id: None)
    with TestClient(app) as client:
        with app.state.session_factory() as session:
            key = create_api_key(session, "alice")
            session.commit()
        headers = {"Authorization": f"Bearer {key}"}
        body = {"method": "sat", "student": "tiny_cnn", "dataset": "cifar10-partial", "epochs": 2,
                "recipe": "reference", "teacher_precision": "fp32"}
        r = client.post("/v1/jobs", headers=headers, json=body)
        assert r.status_code == 201, r.text
        params = r.json()["params"]
        assert (params["recipe"], params["teacher_precision"]) == ("reference", "fp32")
        assert DistillConfig.from_dict({**params, "data_root": "/d"}).recipe == "reference"
        for key_, bad in (("recipe", "fast"), ("teacher_precision", "fp16")):
            r = client.post("/v1/jobs", headers=headers, json={**body, key_: bad})
            assert r.status_code == 422 and key_ in r.json()["detail"], r.text
        assert len(enqueued) == 1


def test_cifar100_kl_scale_only_with_the_reference_reduction() -> None:
    """The reference multiplies its B x C mean KL by 10 on CIFAR-100; batchmean needs no such factor."""
    assert config("rslad").method_overrides(100)["kl_scale"] == 10.0
    assert config("rslad", epochs=15, recipe="reference").method_overrides(100)["kl_scale"] == 10.0
    short = config("rslad", epochs=15).method_overrides(100)
    assert short["kl_reduction"] == "batchmean" and "kl_scale" not in short
    assert config("rslad").method_overrides(10).get("kl_scale") is None
