"""AutoAttack, standard version (Croce & Hein 2020), through PyPI's ``pyautoattack`` 0.2.0.

The standard cascade is APGD-CE (100 iterations), APGD-T (DLR, 9 targets, 100 iterations), FAB-T
(9 targets) and Square (5000 queries), each run on the points still robust, so an example counts as robust
only if it survives all four. torchattacks' AutoAttack runs 10 iterations instead of 100 and is weaker:
it must not be reported as AA, so it is never used here.

pyautoattack has side effects this wrapper contains: its attacks reseed torch's global RNG, its
dynamic-defence check calls ``sys.settrace(None)`` (which would switch off a running coverage tracer or
debugger), and it reports through the ``auto-attack`` logger. Here the global RNG is forked, the trace
function restored, and the logger's records captured: warnings into ``self.warnings``, the rest into
``self.log``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

import torch

from core.attacks.base import Attack, project
from core.errors import ConfigError

LOGGER_NAME = "auto-attack"
STANDARD_TARGETS = 9


class _RecordList(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def contained() -> Iterator[_RecordList]:
    """Run third-party attack code without letting it touch the global RNG, the tracer or the log output."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = _RecordList()
    saved_level, saved_propagate = logger.level, logger.propagate
    saved_trace = sys.gettrace()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    # pyautoattack seeds the CUDA RNG even when it runs on the CPU, so fork every visible GPU's RNG
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=gpus), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler
        for w in caught:
            handler.records.append(logging.makeLogRecord({"levelno": logging.WARNING, "msg": str(w.message)}))
    finally:
        sys.settrace(saved_trace)
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


class AutoAttackStandard(Attack):
    """AA: the strongest attack of the suite, and the paper's headline robustness number."""

    name = "aa"

    def __init__(self, model: torch.nn.Module, eps: float, **kwargs) -> None:
        super().__init__(model, eps, **kwargs)
        try:
            import pyautoattack
        except ImportError as exc:   # a dependency of the project, so this is an installation problem
            raise ConfigError("attack 'aa' needs the package pyautoattack==0.2.0 (pip install "
                              "pyautoattack==0.2.0); torchattacks' AutoAttack is weaker and not a substitute"
                              ) from exc
        self.package_version = pyautoattack.__version__
        self.settings.update({"version": "standard", "norm": "Linf",
                              "attacks": "apgd-ce, apgd-t, fab-t, square",
                              "apgd_iterations": 100, "apgd_t_targets": STANDARD_TARGETS,
                              "fab_t_targets": STANDARD_TARGETS, "square_queries": 5000,
                              "package": f"pyautoattack {self.package_version}"})
        self.settings.setdefault("seed", 0)
        self.log: list[str] = []

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import pyautoattack

        seed = self.int_seed()
        with torch.no_grad():
            num_classes = int(self.model(x[:1]).shape[1])
        adversary = pyautoattack.AutoAttack(self.model, norm="Linf", eps=self.eps, version="standard",
                                            device=x.device, seed=seed)
        self._fit_targets(adversary, num_classes)
        with contained() as captured:
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
        self._keep(captured.records)
        # pyautoattack's own verdict: y_adv is the prediction on the returned point, so an example is robust
        # exactly when it is still classified as y after the whole cascade.
        correct = y_adv.to(y.device) == y
        x_adv = x_adv.detach().float()
        overshoot = (x_adv - x).abs().amax().item() - self.eps
        if overshoot > 1e-6 or x_adv.min().item() < 0 or x_adv.max().item() > 1:
            self.warnings.append(f"aa: pyautoattack returned points outside the eps-ball or [0, 1] "
                                 f"(by up to {max(overshoot, 0.0):.2e}); they were projected back")
        return project(x_adv, x, self.eps), correct

    def _fit_targets(self, adversary, num_classes: int) -> None:
        """With fewer than 10 classes there are not 9 targets: use every other class, and say so."""
        if num_classes >= STANDARD_TARGETS + 1:
            return
        if num_classes < 4:
            raise ConfigError(f"aa: standard AutoAttack needs at least 4 classes (targeted DLR loss), "
                              f"the model has {num_classes}")
        targets = num_classes - 1
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
        self.settings.update({"apgd_t_targets": targets, "fab_t_targets": targets})
        message = (f"aa: the model has {num_classes} classes, so APGD-T and FAB-T use {targets} target "
                   f"classes instead of 9")
        if message not in self.warnings:
            self.warnings.append(message)

    def _keep(self, records: list[logging.LogRecord]) -> None:
        for record in records:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                message = f"aa (pyautoattack): {message}"
                if message not in self.warnings:
                    self.warnings.append(message)
            else:
                self.log.append(message)
