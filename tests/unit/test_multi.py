"""Several students in one data pass: each is bit for bit the student a separate run trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import Cancelled, ConfigError
from core.pipeline import DistillConfig, run_distillation

STUDENTS = [
    {"student": "tiny_cnn", "method": "rslad", "method_params": {"steps": 1}},
    {"student": "tiny_cnn", "method": "ard", "method_params": {"steps": 1}, "name": "ard"},
    {"student": "tiny_cnn", "method": "sat", "method_params": {"steps": 1}},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny learnable npz dataset (4 classes, 3x12x12) and a random tiny_cnn teacher state dict."""
    rng = np.random.default_rng(0)
    y = np.arange(120) % 4
    colours = rng.uniform(40, 215, size=(4, 3))
    x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 40, size=(120, 12, 12, 3)), 0, 255)
    root = tmp_path_factory.mktemp("multi")
    x = x.astype(np.uint8)
    np.savez(root / "d.npz", x=x[:96], y=y[:96], x_test=x[96:], y_test=y[96:])
    from core.models import create_model

    torch.manual_seed(7)
    torch.save(create_model("tiny_cnn", 4).state_dict(), root / "teacher.pt")
    return root / "d.npz", root / "teacher.pt"


def config(files: tuple[Path, Path], **kw) -> DistillConfig:
    data, teacher = files
    base = dict(
        teacher_path=str(teacher),
        teacher_arch="tiny_cnn",
        dataset="npz",
        data_root=str(data),
        epochs=2,
        batch_size=16,
        val_size=16,
        seed=3,
        deterministic=True,
        device="cpu",
        attacks=["clean", "pgd_sat"],
        eval_batch_size=32,
    )
    return DistillConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_one_pass_equals_separate_runs(files, tmp_path: Path) -> None:
    events: list[dict] = []
    multi = run_distillation(config(files, students=STUDENTS), tmp_path / "multi", on_event=events.append)
    names = ["tiny_cnn-rslad", "ard", "tiny_cnn-sat"]
    assert list(multi["students"]) == names
    assert json.loads((tmp_path / "multi" / "report.json").read_text())["students"].keys() == set(names)
    assert {e["student"] for e in events if e["type"] == "epoch"} == set(names)

    drop = {"seconds", "train_seconds", "images_per_s"}

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in drop} for m in history]

    def accuracies(report: dict) -> list[tuple[str, float]]:
        return [(r["attack"], r["accuracy"]) for r in report["final"]["last"]["rows"]]

    for name, spec in zip(names, STUDENTS, strict=True):
        single = {k: v for k, v in spec.items() if k != "name"}
        alone = run_distillation(config(files, **single), tmp_path / name)
        for file in ("student_best.pt", "student_last.pt"):
            a, b = weights(tmp_path / "multi" / name / file), weights(tmp_path / name / file)
            assert all(torch.equal(a[k], b[k]) for k in a), (name, file)
        assert strip(multi["students"][name]["history"]) == strip(alone["history"])
        assert accuracies(multi["students"][name]) == accuracies(alone)


def test_cancelled_pass_resumes_every_student(files, tmp_path: Path) -> None:
    state = {"stop": False}

    def on_event(event: dict) -> None:
        if event["type"] == "progress" and event["epoch"] == 2:
            state["stop"] = True

    with pytest.raises(Cancelled):
        run_distillation(
            config(files, students=STUDENTS[:2]),
            tmp_path,
            on_event=on_event,
            should_stop=lambda: state["stop"],
        )
    report = run_distillation(config(files, students=STUDENTS[:2]), tmp_path)
    assert all(r["resumed_from_epoch"] == 1 for r in report["students"].values())
    assert all([m["epoch"] for m in r["history"]] == [1, 2] for r in report["students"].values())


@pytest.mark.parametrize(
    ("students", "message"),
    [
        ([], "students is empty"),
        ([{"student": "tiny_cnn"}], "'student' and 'method'"),
        ([{"student": "tiny_cnn", "method": "rslad", "lr": 1}], "unknown key(s) lr"),
        ([{"student": "tiny_cnn", "method": "sat"}, {"student": "tiny_cnn", "method": "sat"}], "named"),
        ([{"student": "tiny_cnn", "method": "rslad", "name": "../x"}], "name '../x'"),
        ([{"student": "nope", "method": "rslad"}], "unknown student 'nope'"),
        ([{"student": "tiny_cnn", "method": "rslad", "method_params": {"beta": -1}}], "beta"),
    ],
)
def test_bad_student_lists_are_config_errors(files, students, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config(files, students=students).validate()
    assert message in str(info.value)


def test_students_in_different_precisions_share_one_teacher_forward(files, tmp_path: Path) -> None:
    """One student in bf16 + channels_last, one in fp32: each still equals its separate run."""
    from core.data import load_dataset
    from core.methods import create_method
    from core.models import create_model
    from core.multi import MultiTrainer
    from core.train import TrainConfig, Trainer

    data = load_dataset("npz", files[0], val_size=16, seed=0)
    torch.manual_seed(7)
    teacher = create_model("tiny_cnn", 4)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))

    def trainers(root: Path) -> dict[str, Trainer]:
        out = {}
        for name, amp in (("bf16", True), ("fp32", False)):
            torch.manual_seed(1)
            cfg = TrainConfig(
                batch_size=16,
                seed=0,
                deterministic=True,
                device="cpu",
                amp=amp,
                teacher_amp=True,
                val_attack_steps=1,
            )
            out[name] = Trainer(
                cfg,
                create_method("rslad", steps=1, epochs=1),
                create_model("tiny_cnn", 4),
                teacher,
                data,
                root / name,
            )
        return out

    multi = trainers(tmp_path / "multi")
    assert multi["bf16"].channels_last and not multi["fp32"].channels_last
    MultiTrainer(multi).fit()
    shared_calls, steps = len(calls), multi["bf16"].steps_per_epoch()
    for name, t in trainers(tmp_path / "alone").items():
        t.fit()
        a, b = (
            weights(tmp_path / "multi" / name / "student_last.pt"),
            weights(tmp_path / "alone" / name / "student_last.pt"),
        )
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert shared_calls == steps and len(calls) == 3 * steps  # one forward per batch, then one per run


def test_later_methods_mix_in_one_pass(files, tmp_path: Path) -> None:
    """RSLAD, AdaAD (teacher in the attack) and ABSLD (per-epoch class temperatures) share one pass;
    AdaAD and ABSLD each still equal their separate runs, ABSLD's temperatures included."""
    students = [
        {"student": "tiny_cnn", "method": "rslad", "method_params": {"steps": 1}},
        {"student": "tiny_cnn", "method": "adaad", "method_params": {"steps": 1, "igdm_weight": 5.0}},
        {"student": "tiny_cnn", "method": "absld", "method_params": {"steps": 1, "temp_rate": 0.5}},
    ]
    multi = run_distillation(config(files, students=students), tmp_path / "multi")
    assert list(multi["students"]) == ["tiny_cnn-rslad", "tiny_cnn-adaad", "tiny_cnn-absld"]
    for spec in students[1:]:
        name = f"tiny_cnn-{spec['method']}"
        alone = run_distillation(config(files, **spec), tmp_path / name)
        a = weights(tmp_path / "multi" / name / "student_last.pt")
        b = weights(tmp_path / name / "student_last.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert ([m.get("method_state") for m in multi["students"][name]["history"]]
                == [m.get("method_state") for m in alone["history"]])
    history = multi["students"]["tiny_cnn-absld"]["history"]
    temperatures = [m["method_state"]["temperature_adv"] for m in history]
    assert len(temperatures) == 2 and temperatures[0] != [1.0] * 4
    assert "igdm" in multi["students"]["tiny_cnn-adaad"]["history"][0]


def test_a_teacher_given_to_teacher_free_students_is_ignored_with_their_names(files, tmp_path: Path) -> None:
    """The warning names the job's own methods, not the single-student default ('rslad')."""
    students = [{"student": "tiny_cnn", "method": "sat", "method_params": {"steps": 1}},
                {"student": "tiny_cnn", "method": "trades", "method_params": {"steps": 1}}]
    report = run_distillation(config(files, students=students, epochs=1, attacks=["clean"]), tmp_path / "m")
    ignored = [w for w in report["warnings"] if "teacher file is ignored" in w]
    assert ignored == ["none of this job's methods ('sat', 'trades') uses a teacher; the teacher file is "
                       "ignored"]
