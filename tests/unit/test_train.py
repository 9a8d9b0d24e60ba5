"""The training loop on a tiny CNN and a tiny synthetic dataset: resume, events, cancel, schedule,
selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import load_dataset
from core.errors import Cancelled, ConfigError
from core.methods import create_method
from core.models import create_model
from core.train import TrainConfig, Trainer

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    """96 learnable 3x16x16 images in 4 classes (a colour per class plus noise); 16 held out."""
    rng = np.random.default_rng(0)
    y = np.arange(96) % 4
    colours = rng.uniform(40, 215, size=(4, 3))
    x = colours[y][:, None, None, :] + rng.normal(0, 40, size=(96, 16, 16, 3))
    x = np.clip(x, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x[:80], y=y[:80], x_test=x[80:], y_test=y[80:])
    return load_dataset("npz", path, val_size=16, seed=0)


def make_trainer(
    out: Path, data, *, method: str = "rslad", seed: int = 0, trainer_cls=Trainer, **kw
) -> Trainer:
    torch.manual_seed(1000)
    teacher = create_model("tiny_cnn", data.num_classes) if method == "rslad" else None
    torch.manual_seed(seed)
    student = create_model("tiny_cnn", data.num_classes)
    m = (
        create_method(method, steps=1, epochs=EPOCHS)
        if method != "natural"
        else create_method(method, epochs=EPOCHS)
    )
    cfg = TrainConfig(batch_size=16, seed=0, deterministic=True, device="cpu", val_attack_steps=2)
    return trainer_cls(cfg, m, student, teacher, data, out, **kw)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_cancel_is_bit_identical(tmp_path: Path, data) -> None:
    full = make_trainer(tmp_path / "a", data).fit()

    state = {"stop": False}

    def on_event(event: dict) -> None:
        if event["type"] == "progress" and event["epoch"] == 2 and event["step"] == 1:
            state["stop"] = True

    with pytest.raises(Cancelled):
        make_trainer(tmp_path / "b", data, on_event=on_event, should_stop=lambda: state["stop"]).fit()
    assert load(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1

    # A differently initialised student: every weight must come from the checkpoint.
    resumed = make_trainer(tmp_path / "b", data, seed=123).fit()
    assert resumed["resumed_from"] == 1
    for name in ("student_last.pt", "student_best.pt"):
        a, b = load(tmp_path / "a" / name), load(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    drop = {"seconds", "train_seconds", "images_per_s"}
    strip = [{k: v for k, v in m.items() if k not in drop} for m in full["history"]]
    assert strip == [{k: v for k, v in m.items() if k not in drop} for m in resumed["history"]]
    assert resumed["best"] == full["best"]


def test_events_and_files(tmp_path: Path, data) -> None:
    events: list[dict] = []
    result = make_trainer(tmp_path, data, on_event=events.append).fit()

    progress = [e for e in events if e["type"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {e["steps"] for e in progress} == {4} and progress[-1]["eta_s"] == pytest.approx(0.0, abs=1e-6)
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [1, 2, 3]
    assert [e["epoch"] for e in events if e["type"] == "checkpoint"] == [1, 2, 3]

    metrics = result["history"][-1]
    for key in (
        "loss",
        "kl_adv",
        "kl_nat",
        "train_acc",
        "val_clean_acc",
        "val_robust_acc",
        "lr",
        "seconds",
        "images_per_s",
    ):
        assert key in metrics, key
    assert metrics["images"] == 64

    ckpt = load(tmp_path / "checkpoint.pt")  # weights_only=True must read every field back
    assert ckpt["epoch"] == EPOCHS and {"torch", "python", "numpy"} <= set(ckpt["rng"])
    assert ckpt["config"]["method"] == "rslad" and len(ckpt["history"]) == EPOCHS
    for name in ("student_best.pt", "student_last.pt"):
        create_model("tiny_cnn", data.num_classes).load_state_dict(load(tmp_path / name), strict=True)
    assert not list(tmp_path.glob("*.tmp"))


def test_cancel_is_prompt_and_leaves_no_checkpoint(tmp_path: Path, data) -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return True

    with pytest.raises(Cancelled):
        make_trainer(tmp_path, data, should_stop=stop).fit()
    assert len(calls) == 1
    assert not (tmp_path / "checkpoint.pt").exists()


def test_milestones_scale_with_epochs(tmp_path: Path, data) -> None:
    trainer = make_trainer(tmp_path, data)
    assert trainer.milestones == (2,)  # RSLAD's 215/260/285 of 300, scaled to 3 epochs
    # batch 16: the reference lr 0.1 (batch 128) scaled by the linear rule to 0.0125
    assert [m["lr"] for m in trainer.fit()["history"]] == pytest.approx([0.0125, 0.0125, 0.00125])
    thirty = Trainer(
        TrainConfig(device="cpu"),
        create_method("rslad", epochs=30),
        create_model("tiny_cnn", 4),
        None,
        data,
        tmp_path / "other",
    )
    assert thirty.epochs == 30 and thirty.milestones == (22, 26, 29)


class ScriptedValidation(Trainer):
    """Validation returns fixed numbers, so the selection rule is tested, not the model's luck."""

    robust = [0.25, 0.5, 0.375]
    clean = [0.5, 0.25, 0.75]

    def _validate(self) -> dict[str, float]:
        e = len(self.history)
        out = {"val_clean_acc": self.clean[e]}
        if self.select_on == "val_robust_acc":
            out["val_robust_acc"] = self.robust[e]
        return out


@pytest.mark.parametrize(("method", "best_epoch"), [("rslad", 2), ("natural", 3)])
def test_best_checkpoint_is_the_best_validation_epoch(
    tmp_path: Path, data, method: str, best_epoch: int
) -> None:
    weights: dict[int, dict[str, torch.Tensor]] = {}
    trainer: Trainer

    def on_event(event: dict) -> None:
        if event["type"] == "epoch":
            weights[event["epoch"]] = {k: v.clone() for k, v in trainer.student.state_dict().items()}

    trainer = make_trainer(tmp_path, data, method=method, trainer_cls=ScriptedValidation, on_event=on_event)
    result = trainer.fit()
    assert result["best"]["epoch"] == best_epoch
    assert [m["best"] for m in result["history"]] == (
        [True, True, False] if method == "rslad" else [True, False, True]
    )
    best = load(tmp_path / "student_best.pt")
    assert all(torch.equal(best[k], weights[best_epoch][k]) for k in best)


def test_resume_refuses_a_different_run(tmp_path: Path, data) -> None:
    make_trainer(tmp_path, data, method="sat").fit()
    with pytest.raises(ConfigError, match="different run"):
        make_trainer(tmp_path, data, method="rslad").fit()


def test_teacher_precision_is_set_apart_from_the_student(tmp_path: Path, data) -> None:
    from core.train import bf16_supported

    native = bf16_supported(torch.device("cpu"))
    sat, tiny = create_method("sat", epochs=1), create_model("tiny_cnn", 4)
    auto = Trainer(TrainConfig(device="cpu"), sat, tiny, None, data, tmp_path / "a")
    assert auto.amp == native and auto.channels_last == native and auto.teacher_amp == native
    forced = Trainer(
        TrainConfig(device="cpu", amp=True, teacher_amp=False), sat, tiny, None, data, tmp_path / "f"
    )
    assert forced.amp is True and forced.teacher_amp is False
    assert forced.resolved()["teacher_amp"] is False


def test_depthwise_layers_run_in_fp32_under_bf16_autocast() -> None:
    """The CPU lever for MobileNets: depthwise convolutions in fp32, the rest of the model in bf16, the
    same weights and state_dict, and nothing changed outside autocast."""
    from torch import nn

    from core.device import depthwise_in_fp32

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1), nn.Flatten()
    )
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    keys, fp32_out = list(model.state_dict()), model(x)
    seen: dict[str, torch.dtype] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out.dtype))
    handles = depthwise_in_fp32(model, torch.device("cpu"))
    assert len(handles) == 2 and list(model.state_dict()) == keys
    assert torch.equal(model(x), fp32_out)  # no autocast: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert torch.is_autocast_enabled("cpu")  # restored after the depthwise layer
    assert seen == {"0": torch.bfloat16, "1": torch.float32, "2": torch.bfloat16, "3": torch.bfloat16}
    torch.testing.assert_close(out.float(), fp32_out, atol=0.05, rtol=0.05)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    for handle in handles:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert seen["1"] == torch.bfloat16


def test_depthwise_fp32_is_a_cpu_amp_lever(tmp_path: Path, data) -> None:
    def trainer(folder: str, **config) -> Trainer:
        model = create_model("mobilenet_v2", 4)
        return Trainer(TrainConfig(device="cpu", **config), create_method("sat", epochs=1), model, None, data,
                       tmp_path / folder)

    on = trainer("a", amp=True)
    assert on.depthwise_fp32 is True and on.resolved()["depthwise_fp32"] is True
    assert trainer("b", amp=True, depthwise_fp32=False).depthwise_fp32 is False
    assert trainer("c", amp=False).depthwise_fp32 is False  # nothing to keep in fp32 without autocast


def test_batchnorm_folding_follows_amp_and_eval_mode_attacks(tmp_path: Path, data) -> None:
    def trainer(folder: str, method: str = "sat", **config) -> Trainer:
        return Trainer(TrainConfig(device="cpu", **config), create_method(method, epochs=1),
                       create_model("resnet18", 4), None, data, tmp_path / folder)

    assert trainer("a", amp=True).fold_bn is True
    assert trainer("b", amp=False).fold_bn is False  # fp32 is the reference's arithmetic exactly
    assert trainer("c", amp=False, fold_bn=True).resolved()["fold_bn"] is True
    assert trainer("d", method="ard", amp=True).fold_bn is False  # ARD attacks in train mode


class _RecordingTeacher(torch.nn.Module):
    """A tiny CNN that records the dtype of its logits inside the forward (bf16 under a bf16 autocast)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = create_model("tiny_cnn", num_classes)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize(("amp", "precision", "expected"), [
    (False, "auto", torch.float32),   # --no-amp: the teacher in fp32 too, even where bf16 is native
    (None, "auto", torch.bfloat16),   # amp auto (native here): the teacher in bf16
    (False, "bf16", torch.bfloat16),  # asked for explicitly
    (True, "fp32", torch.float32),
])
def test_teacher_precision_follows_amp_and_the_setting(
    tmp_path: Path, data, monkeypatch: pytest.MonkeyPatch, amp, precision, expected
) -> None:
    import core.train

    monkeypatch.setattr(core.train, "bf16_supported", lambda device: True)  # bf16 "native" on this CPU
    teacher = _RecordingTeacher(data.num_classes)
    cfg = TrainConfig(batch_size=16, device="cpu", amp=amp, teacher_precision=precision)
    student = create_model("tiny_cnn", data.num_classes)
    trainer = Trainer(cfg, create_method("rslad", steps=1, epochs=1), student, teacher, data, tmp_path)
    logits = trainer.make_batch(data.train.x[:4].float() / 255, data.train.y[:4]).teacher_logits()
    assert teacher.dtypes == [expected] and logits.dtype == torch.float32
    assert trainer.resolved()["teacher_precision"] == ("bf16" if expected == torch.bfloat16 else "fp32")


def _lrs(trainer: Trainer) -> list[float]:
    """The lr of every epoch, stepping the trainer's scheduler as the loop does."""
    out = []
    for _ in range(trainer.epochs):
        out.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        trainer.scheduler.step()
    return out


@pytest.mark.parametrize("method", ["ard", "iad"])
def test_ard_and_iad_follow_the_reference_lr_schedule(tmp_path: Path, data, method: str) -> None:
    """Their code sets base_lr * 0.1 at each milestone: 0.1 -> 0.01 and it stays there (not 0.001)."""
    teacher = create_model("tiny_cnn", data.num_classes)
    cfg = TrainConfig(batch_size=128, device="cpu")
    lrs = {}
    for schedule in ("reference", "step"):
        m = create_method(method, epochs=4, milestones=[2, 3], lr_schedule=schedule)
        student = create_model("tiny_cnn", data.num_classes)
        trainer = Trainer(cfg, m, student, teacher, data, tmp_path / schedule)
        lrs[schedule] = _lrs(trainer)
    assert lrs["reference"] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert lrs["step"] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert create_method(method).lr_schedule == "reference"  # the default
    sat = Trainer(cfg, create_method("sat", epochs=4, milestones=[2, 3]), create_model("tiny_cnn", 4), None,
                  data, tmp_path / "sat")
    assert _lrs(sat) == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_optimiser_settings_precedence(tmp_path: Path, data) -> None:
    """lr: the method's parameter, then the job-level lr, then the linear rule; momentum and weight decay
    from the method (MART's ResNet-18 reference: lr 0.01, weight decay 3.5e-3)."""
    def trainer(name: str, method_lr=None, job_lr=None) -> Trainer:
        params = {"lr": method_lr, "weight_decay": 3.5e-3} if method_lr else {}
        m = create_method("mart", steps=1, epochs=1, **params)
        cfg = TrainConfig(batch_size=16, device="cpu", lr=job_lr)
        return Trainer(cfg, m, create_model("tiny_cnn", data.num_classes), None, data, tmp_path / name)

    both = trainer("a", method_lr=0.01, job_lr=0.05)
    group = both.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 3.5e-3)
    resolved = both.resolved()
    assert (resolved["lr"], resolved["lr_rule"]) == (0.01, "method parameter lr")
    assert resolved["weight_decay"] == 3.5e-3
    job = trainer("b", job_lr=0.05)
    assert job.lr == 0.05 and job.optimizer.param_groups[0]["weight_decay"] == 2e-4
    linear = trainer("c")
    assert linear.lr == pytest.approx(0.1 * 16 / 128) and linear.resolved()["momentum"] == 0.9


def _drop_from_checkpoint(path: Path, keys: tuple[str, ...]) -> None:
    """Make ``path`` look like a checkpoint written before these method parameters existed."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in keys:
        ckpt["config"]["method_params"].pop(key)
    torch.save(ckpt, path)


def test_resume_reads_checkpoints_older_than_the_optimiser_parameters(tmp_path: Path, data) -> None:
    make_trainer(tmp_path / "r", data).fit()
    _drop_from_checkpoint(tmp_path / "r" / "checkpoint.pt", ("lr", "momentum", "weight_decay"))
    assert make_trainer(tmp_path / "r", data).fit()["resumed_from"] == EPOCHS

    teacher = create_model("tiny_cnn", data.num_classes)
    cfg = TrainConfig(batch_size=16, device="cpu", val_attack_steps=1)

    def ard(schedule: str | None) -> Trainer:
        extra = {"lr_schedule": schedule} if schedule else {}
        return Trainer(cfg, create_method("ard", steps=1, epochs=1, **extra),
                       create_model("tiny_cnn", data.num_classes), teacher, data, tmp_path / "ard")

    ard("step").fit()
    _drop_from_checkpoint(tmp_path / "ard" / "checkpoint.pt", ("lr_schedule", "kl_reduction", "lr"))
    with pytest.raises(ConfigError, match="different run"):  # it divided at every milestone: not 'reference'
        ard(None).fit()
    assert ard("step").fit()["resumed_from"] == 1
