"""BatchNorm folding for the attack (core.fold): the same function as the student in eval mode, kept in
step with the student's weights, and used only by eval-mode attacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.fold import FoldedEval
from core.methods import Batch, create_method
from core.models import create_model


def _randomize_batchnorms(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


@pytest.mark.parametrize("arch, left", [("resnet18", 0), ("mobilenet_v2", 0), ("preact_resnet18", None)])
def test_folded_view_is_the_student_in_eval_mode(arch: str, left: int | None) -> None:
    torch.manual_seed(0)
    student = create_model(arch, 10).eval()
    _randomize_batchnorms(student)
    student.double()
    folded = FoldedEval.build(student)
    assert folded is not None
    module = folded.refreshed()
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    if left is not None:
        assert remaining == left
    assert remaining < sum(isinstance(m, nn.BatchNorm2d) for m in student.modules())
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out1, out2 = student(x1), module(x2)
    torch.testing.assert_close(out2, out1, rtol=1e-9, atol=1e-9)
    (g1,) = torch.autograd.grad(out1.logsumexp(1).sum(), x1)
    (g2,) = torch.autograd.grad(out2.logsumexp(1).sum(), x2)
    torch.testing.assert_close(g2, g1, rtol=1e-9, atol=1e-9)


def test_refresh_follows_training_and_leaves_the_student_alone() -> None:
    torch.manual_seed(0)
    student = create_model("resnet18", 10)
    folded = FoldedEval.build(student.eval())
    assert folded is not None and all(not p.requires_grad for _, _, f in folded.pairs for p in f.parameters())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    x = torch.rand(8, 3, 32, 32)
    for _ in range(2):  # train mode: the weights and the BatchNorm statistics move
        student.train()
        optimizer.zero_grad()
        nn.functional.cross_entropy(student(x), torch.arange(8) % 10).backward()
        optimizer.step()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = folded.refreshed()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), student(x), rtol=1e-4, atol=1e-4)


def test_the_view_is_traced_in_eval_mode_and_leaves_the_mode_alone() -> None:
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(self.bn(self.conv(x)), p=0.5, training=self.training)

    student = Dropping().train()
    folded = FoldedEval.build(student)
    assert folded is not None and student.training and student.bn.training
    student.eval()  # as Method.loss does before an eval-mode attack
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded.refreshed()(x), student(x))  # no dropout baked in


def test_an_untraceable_student_is_attacked_unfolded() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn(self.conv(x))
            return out if out.sum() > 0 else -out  # data-dependent: fx cannot trace it

    assert FoldedEval.build(Branchy().eval()) is None
    assert FoldedEval.build(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) is None  # nothing to fold


def test_eval_mode_attacks_use_the_folded_student_and_lose_nothing() -> None:
    torch.manual_seed(0)
    student, teacher = create_model("tiny_cnn", 4).double(), create_model("tiny_cnn", 4).double().eval()
    _randomize_batchnorms(student)
    x, y = torch.rand(6, 3, 32, 32, dtype=torch.float64), torch.arange(6) % 4
    calls: list[int] = []

    def loss(method_name: str, fold: bool) -> float:
        model = copy.deepcopy(student)  # the outer loss (train mode) moves the BatchNorm statistics
        folded = FoldedEval.build(model.eval()) if fold else None
        if folded is not None:
            folded.module.register_forward_hook(lambda *_: calls.append(1))
        batch = Batch(x, y, teacher, generator=torch.Generator().manual_seed(1), folded=folded)
        return float(create_method(method_name, steps=3).loss(model, batch, epoch=0)[0].detach())

    assert loss("rslad", True) == pytest.approx(loss("rslad", False), rel=1e-9)
    assert len(calls) == 3  # one forward per attack step, none for the outer loss (train mode)
    calls.clear()
    loss("ard", True)  # ARD attacks in train mode, where BatchNorm uses batch statistics: not folded
    assert calls == []
