"""Opt-in Lightning callbacks factory (entry point ``lightning.pytorch.callbacks_factory``).

Installing the package attaches NOTHING: Lightning calls :func:`callbacks_factory` for every
Trainer, and it returns an empty list unless ``FISHER_CALLBACKS=1`` (or ``true``/``yes``) is set.
Then it returns a :class:`FisherMonitor` (and, with ``FISHER_CALLBACKS_REFERENCE=general,...``
naming probe tasks served by ``probe_dataloader(task)``, a ForgettingRiskMonitor and a
QKOVInterferenceMonitor for them), so the suite can be enabled on an existing script without code
changes. ``FISHER_CALLBACKS_TRAIN_TASK`` names the training task (default ``train``).

The factory runs for EVERY Trainer of the process, also those of models it cannot monitor: its
monitors are built with ``required=False``, so a model whose attention cannot be mapped (or
without a probe loader for a named reference task) gets one warning and a fit without them.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback

ENV_FLAG = "FISHER_CALLBACKS"


def callbacks_factory() -> list[Callback]:
    if os.environ.get(ENV_FLAG, "").strip().lower() not in ("1", "true", "yes", "on"):
        return []
    from .callbacks import FisherMonitor, ForgettingRiskMonitor, QKOVInterferenceMonitor

    train = os.environ.get("FISHER_CALLBACKS_TRAIN_TASK", "train")
    refs = [t for t in os.environ.get("FISHER_CALLBACKS_REFERENCE", "").split(",") if t.strip()]
    monitor = FisherMonitor(train_task=train, reference_tasks=[t.strip() for t in refs], required=False)
    out: list[Callback] = [monitor]
    if refs:
        out.append(QKOVInterferenceMonitor(monitor, pairs=[(r.strip(), train) for r in refs]))
        out.append(ForgettingRiskMonitor(monitor, reference_tasks=[r.strip() for r in refs]))
    return out
