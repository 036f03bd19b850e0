"""The suite on the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``, a subclass): one ``TrainerCallback``.

:class:`FisherTrainerCallback` drives the same engine as the Lightning callbacks
(:class:`~fisher_callbacks.engine.fisher.FisherEngine`,
:class:`~fisher_callbacks.engine.qkov.QKOVEngine`,
:class:`~fisher_callbacks.engine.forgetting.ForgettingEngine`) from the Trainer's events:

========================================  ==================================================
Trainer event                             engine
========================================  ==================================================
``on_train_begin``                        set-up, anchor, memory ledger; a forward pre-hook
                                          on the model
model forward (training, pre-hook)        ``task``/``sample_id`` popped from the inputs (the
                                          model never sees them); capture armed with the
                                          Trainer's own per-sample loss factor
``on_substep_end``/``on_pre_optimizer``   the captured samples are filed
``on_step_end``                           the per-step forgetting forecast, early probes
``on_evaluate``                           the boundary: probe passes, Fisher sync, QK-OV
                                          maps, forgetting, warning, stop
``on_save``                               the engines' state beside the checkpoint
``on_train_end``                          a last boundary when no evaluation ran; hooks off
========================================  ==================================================

**Loss scaling.** The Trainer divides a causal LM's summed token loss by ``num_items_in_batch``,
the target tokens of every micro-batch of the optimizer step (of every process with
``average_tokens_across_devices``, which then multiplies the loss by the process count), and a
model without loss kwargs' mean loss by ``gradient_accumulation_steps``. The pre-hook reads the
``num_items_in_batch`` the model receives, so each captured gradient is divided by exactly the
weight its sample had in the backward: per-sample gradients equal a micro-batch-1 loop's
(``tests/test_hf.py``). TRL's ``SFTTrainer`` sums per-token ``log_probs`` of a fused LM head and
never hands the model ``num_items_in_batch``: the weight per target token is read from the
gradient that reaches ``log_probs`` (uniform), before any monitored projection's, and corrects the
armed factors (``tests/test_hf_trl.py``); a loss that weights its target tokens unequally (TRL's
``loss_type="dft"``) is one warning. When the Trainer computes the loss itself (``label_smoothing_factor``,
``compute_loss_func``) it pops ``labels`` before the model's forward: nothing is captured (one
warning). A weighted or auxiliary loss the model computes is measured at the logits by the loss
check (one warning).

**Columns.** ``task`` and ``sample_id`` batch entries reach the callback and never the model's
``forward``. The Trainer's default ``remove_unused_columns=True`` drops them before the collator
(they are not arguments of ``forward``): every sample is then filed under ``train_task``, with one
warning. Pass ``remove_unused_columns=False`` to keep them.

**Logging.** Scalars go to ``trainer.state.log_history`` and to every ``report_to`` integration
through its own ``on_log`` (W&B, TensorBoard, MLflow, ... name them as they name the Trainer's
scalars, e.g. ``train/forgetting/general/measured`` on W&B); figures and tables go to the W&B run
and the TensorBoard writer of those integrations, and as PNG/CSV files under
``{output_dir}/fisher_callbacks/``. ``stop_threshold`` sets ``control.should_training_stop``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

from .engine.fisher import FisherEngine
from .engine.forgetting import ForgettingEngine
from .engine.host import Host
from .engine.qkov import QKOVEngine
from .engine.ranks import gather
from .engine.sharding import sharding_of
from .losses import reduction_scale, target_token_counts
from .sinks import FolderSink, Sink, TensorBoardSink, WandbSink, warn_once

log = logging.getLogger("fisher_callbacks")

__all__ = ["STATE_FILE", "FisherTrainerCallback", "HFHost"]

STATE_FILE = "fisher_callbacks.pt"  # the monitors' state, in each checkpoint-{step} folder


class HFHost(Host):
    """The Hugging Face Trainer as the engine's :class:`Host`, at one event."""

    def __init__(
        self,
        callback: FisherTrainerCallback,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module,
    ) -> None:
        self.callback, self.args, self.state, self.control = callback, args, state, control
        self.module = model
        self.step = int(state.global_step)
        self.is_global_zero = bool(state.is_world_process_zero)
        self.world_size = int(args.world_size)
        self.accumulate = int(args.gradient_accumulation_steps)
        # The .grad check compares .grad after the first micro-batch's backward with the captured
        # sum: the Trainer clips .grad before on_pre_optimizer_step when it is the only one.
        clips = args.max_grad_norm is not None and args.max_grad_norm > 0
        self.automatic_optimization = not (clips and self.accumulate == 1)
        self.sinks = callback.sinks
        self.log_every_n_steps = max(int(args.logging_steps), 1)  # a fraction of the run: every step

    def log_scalars(
        self, values: Mapping[str, float], *, sync_dist: bool = False, rank_zero_only: bool = False
    ) -> None:
        collecting = self.callback._collecting  # a boundary's scalars, for the eval metrics
        if collecting is not None and (self.is_global_zero or not rank_zero_only):
            collecting.update(values)
        if self.is_global_zero and values:
            self.callback.emit(self, dict(values))

    def log_now(self, values: Mapping[str, float]) -> None:
        self.log_scalars(values)

    def any_rank(self, flag: bool) -> bool:
        return any(gather(bool(flag)))

    def request_stop(self) -> None:
        self.control.should_training_stop = True

    @property
    def stopping(self) -> bool:
        return bool(self.control.should_training_stop)

    @property
    def validation_interval(self) -> float | None:
        if _eval_strategy(self.args) != "steps":
            return None
        every = self.args.eval_steps or self.args.logging_steps
        if every is not None and 0 < every < 1:  # a fraction of the run
            every = math.ceil(self.state.max_steps * every)
        return float(every) if every else None

    def boundary_follows(self) -> bool:
        return bool(self.control.should_evaluate)


class FisherTrainerCallback(TrainerCallback):
    """The whole suite (Fisher capture, QK-OV interference, forgetting risk) on a ``transformers.Trainer``.

    Args:
        train_task, reference_tasks, capture_every_n_steps: as
            :class:`~fisher_callbacks.callbacks.FisherMonitor` (``reference_tasks`` must be
            ``{task: DataLoader}``: the Trainer has no datamodule to ask).
        pairs: ``(task_a, task_b)`` QK-OV pairs (collector keys, e.g. ``("general", "math")``);
            empty: no QK-OV maps.
        warn_threshold, stop_threshold, relative, horizon_steps: the forgetting monitor's (see
            :class:`~fisher_callbacks.callbacks.ForgettingRiskMonitor`); forgetting is watched for
            every reference task unless ``forgetting=False``.
        forgetting: watch forgetting of the reference tasks.
        qkov_options, forgetting_options: further arguments of the QK-OV and forgetting monitors
            (``n_permutations``, ``top_k``, ``early_probe_step``, ...).
        **fisher_options: further arguments of :class:`~fisher_callbacks.callbacks.FisherMonitor`
            (``ema_decay``, ``store``, ``gradient_memory_mb``, ``task_key``, ...).

    The engines are public: ``callback.fisher`` (collector, probe readings), ``callback.qkov``
    (``latest`` heatmaps) and ``callback.forgetting`` (``history``, ``alerts``, ``stopped_at``).
    """

    def __init__(
        self,
        train_task: str = "train",
        reference_tasks: Mapping[str, Any] | None = None,
        capture_every_n_steps: int = 50,
        *,
        pairs: Sequence[tuple[str, str]] = (),
        warn_threshold: float = 0.1,
        stop_threshold: float | None = None,
        relative: bool = False,
        horizon_steps: float | None = None,
        forgetting: bool = True,
        qkov_options: Mapping[str, Any] | None = None,
        forgetting_options: Mapping[str, Any] | None = None,
        **fisher_options: Any,
    ) -> None:
        if reference_tasks is not None and not isinstance(reference_tasks, Mapping):
            raise TypeError(
                "reference_tasks must be {task: DataLoader} on the Hugging Face Trainer (it has no "
                f"datamodule to ask for probe loaders), got {type(reference_tasks).__name__}"
            )
        self._options = dict(
            train_task=train_task,
            reference_tasks=reference_tasks,
            capture_every_n_steps=capture_every_n_steps,
            pairs=list(pairs),
            forgetting=forgetting,
            forgetting_args=dict(
                warn_threshold=warn_threshold,
                stop_threshold=stop_threshold,
                relative=relative,
                horizon_steps=horizon_steps,
                **dict(forgetting_options or {}),
            ),
            qkov_options=dict(qkov_options or {}),
            fisher_options=fisher_options,
        )
        self._build_engines()
        self._fitted = False  # a fit ran with these engines
        self.sinks: list[Sink] = []
        self._integrations: list[TrainerCallback] = []
        self._events: tuple[TrainingArguments, TrainerState, TrainerControl, torch.nn.Module] | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._assumed: float | None = None  # assumed factor per target token of the armed micro-batch
        self._training = False
        self._evaluated_at: int | None = None
        self._collecting: dict[str, float] | None = None  # the scalars of the boundary running
        self._boundary_values: dict[str, float] = {}  # those of the last boundary (eval metrics)
        self._warned_columns = False
        self._warned_labels = False
        self._loaded = False  # a state was loaded (resume)

    # ------------------------------------------------------------------ engines
    def _build_engines(self) -> None:
        """The engines, new, from the constructor's arguments (checked here, at construction)."""
        o = self._options
        self.fisher = FisherEngine(
            train_task=o["train_task"],
            reference_tasks=o["reference_tasks"],
            capture_every_n_steps=o["capture_every_n_steps"],
            **o["fisher_options"],
        )
        self.qkov = QKOVEngine(self.fisher, pairs=o["pairs"], **o["qkov_options"]) if o["pairs"] else None
        watched = list(o["reference_tasks"] or ())
        self.forgetting = (
            ForgettingEngine(self.fisher, reference_tasks=watched, **o["forgetting_args"])
            if o["forgetting"] and watched
            else None
        )

    @property
    def engines(self) -> list[Any]:
        """The engines of this run, in the order their boundaries run."""
        return [e for e in (self.fisher, self.qkov, self.forgetting) if e is not None]

    def _host(self, args, state, control, model) -> HFHost:
        self._events = (args, state, control, model)
        return HFHost(self, args, state, control, model)

    def emit(self, host: HFHost, values: dict[str, float]) -> None:
        """Scalars at ``host.step``: a row of ``state.log_history`` and every integration's
        ``on_log`` (what ``Trainer.log`` does with its own scalars)."""
        host.state.log_history.append({**values, "step": host.step})
        for integration in self._integrations:
            try:
                integration.on_log(host.args, host.state, host.control, logs=dict(values))
            except Exception as err:
                warn_once(integration, "log scalars", err)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._fitted and not self._loaded:
            self._build_engines()  # one fit is one run: a reused callback starts afresh
        self._fitted, self._evaluated_at, self._warned_columns = True, None, False
        self._warned_labels, self._boundary_values = False, {}
        host = self._host(args, state, control, model)
        self._connect(args)
        if state.global_step > 0:
            self._resume(args, state)
        self._loaded = False
        self.fisher.prepare(host, probe_gradients_wanted=self.forgetting is not None)
        if not self.fisher.active:
            return
        for engine in self.engines[1:]:
            engine.prepare(host)
        self.fisher.resolve(model)
        if self.forgetting is not None:
            with self.forgetting.relay.contain("the anchor at fit start"):
                self.forgetting.fit_begin(host)
            self.forgetting.train_begin(host)
        self.fisher.log_memory(host, self.engines)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        self._training = True
        if fsdp_not_applied(args, model):
            warnings.warn(
                "fisher_callbacks: TrainingArguments.fsdp is set but the model is not sharded "
                "(accelerate runs FSDP on accelerators only and falls back to DDP on CPU, "
                "silently): the callbacks watch the run as it is, unsharded.",
                stacklevel=2,
            )
        if _eval_strategy(args) == "no" and (self.qkov is not None or self.forgetting is not None):
            warnings.warn(
                "fisher_callbacks: eval_strategy='no': the QK-OV and forgetting monitors evaluate "
                "at each on_evaluate, so they evaluate once at the end of training instead; set "
                "eval_strategy='steps' and eval_steps to watch the run while it trains.",
                stacklevel=2,
            )

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pop the callback's columns; on a training forward, arm the capture for this micro-batch."""
        task_key, id_key = self.fisher.task_key, self.fisher.sample_id_key
        columns = {k: kwargs.pop(k) for k in (task_key, id_key) if k in kwargs}
        if not (self._training and module.training and torch.is_grad_enabled()) or self._events is None:
            return args, kwargs
        labels = kwargs.get("labels")
        if labels is None:
            if not self._warned_labels:
                self._warned_labels = True
                self.fisher.relay.warn(
                    "a training forward of the model got no labels (the Trainer pops them when it "
                    "computes the loss itself: label_smoothing_factor, compute_loss_func, a "
                    "compute_loss that does not pass them): its samples are not captured, and "
                    f"the Fisher of train_task={self.fisher.train_task!r} stays empty"
                )
            return args, kwargs
        if task_key not in columns and not self._warned_columns:
            self._warned_columns = True
            self.fisher.relay.warn(self._missing_columns_message())
        host = HFHost(self, *self._events)
        known = kwargs.get("num_items_in_batch") is not None
        if not known:  # the factor is measured in the backward (_post_forward): no .grad check
            host.automatic_optimization = False
        batch = {"labels": labels, "input_ids": kwargs.get("input_ids"), **columns}
        with self.fisher.relay.catch("capture: "):
            scale = self._scale(host, labels, kwargs)
            self.fisher.batch_start(host, batch, scale=scale)
            if not known and bool((scale > 0).any()):
                counts = target_token_counts(labels, self.fisher.loss_type).float()
                # s_i n_i is the same for every sample: the inverse of the assumed weight per token
                self._assumed = float((scale * counts)[scale > 0].mean())
        return args, kwargs

    def _post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """TRL's fused LM head (``fused_lm_head=True``) returns per-token ``log_probs`` and no
        logits, and the trainer divides their sum by a ``num_items_in_batch`` the model never
        sees: the factor per target token is measured from the gradient that reaches
        ``log_probs`` (uniform, ``-c``), before any monitored projection's, and the armed factors
        are corrected by it."""
        assumed, self._assumed = self._assumed, None
        log_probs = getattr(output, "log_probs", None)
        if assumed is None or getattr(output, "logits", None) is not None:
            return
        if not (torch.is_tensor(log_probs) and log_probs.requires_grad):
            return

        def measured(grad: torch.Tensor) -> None:
            grad = grad.float()
            weights = -grad[grad != 0]  # each target token's weight in the loss
            if weights.numel() and float(weights.max() - weights.min()) > 1e-3 * float(weights.abs().max()):
                self.fisher.relay.warn(
                    "the training loss weights its target tokens unequally (TRL's loss_type='dft'?): "
                    "captured per-sample gradients are those of that weighted loss, divided by the "
                    "mean weight per token, not of the samples' own token-mean losses"
                )
            per_token = -float(grad.mean())  # the weight of each target token's loss
            capture = self.fisher.capture
            if capture is not None and math.isfinite(per_token) and per_token > 0:
                capture.rescale(1.0 / (per_token * assumed))

        log_probs.register_hook(measured)

    def _missing_columns_message(self) -> str:
        args = self._events[0]
        why = (
            "the Trainer's remove_unused_columns=True dropped it (it is not an argument of the "
            "model's forward); pass remove_unused_columns=False to keep it"
            if getattr(args, "remove_unused_columns", False)
            else "the collator does not pass it"
        )
        return (
            f"training batches have no {self.fisher.task_key!r} column ({why}): every training "
            f"sample is filed under train_task={self.fisher.train_task!r}"
        )

    def _scale(self, host: HFHost, labels: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """Each sample's ``s_i`` of :func:`~fisher_callbacks.losses.reduction_scale` (the inverse of
        its weight in this micro-batch's loss): ``num_items_in_batch / n_i`` (over the process
        count when the Trainer averages tokens across devices) when the model divides its summed
        loss by ``num_items_in_batch``; else the model's token mean over the Trainer's
        ``gradient_accumulation_steps``."""
        loss_type = self.fisher.loss_type
        items = kwargs.get("num_items_in_batch")
        if items is None:
            return reduction_scale(labels, loss_type, "token_mean", accumulate_grad_batches=host.accumulate)
        total = float(items.sum() if torch.is_tensor(items) else items)
        averaged = getattr(host.args, "average_tokens_across_devices", False)
        processes = host.world_size if (averaged and host.world_size > 1) else 1
        # the loss is processes * token_sum / num_items_in_batch
        return reduction_scale(labels, loss_type, "token_sum", loss_scale=processes / max(total, 1.0))

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._filed(args, state, control, model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._filed(args, state, control, model)

    def _filed(self, args, state, control, model) -> None:
        if not self._training:
            return
        host = self._host(args, state, control, model)
        self.fisher.after_backward(host)
        self.fisher.batch_end()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._training:
            return
        host = self._host(args, state, control, model)
        self.fisher.batch_end()
        if self.forgetting is not None:
            self.forgetting.step_end(host)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        """The boundary; its scalars join the evaluation's ``metrics`` as ``eval_<name>`` (what
        ``metric_for_best_model`` and ``EarlyStoppingCallback`` read)."""
        if not self._training:
            return
        self._boundary(self._host(args, state, control, model))
        if isinstance(metrics, dict):
            metrics.update({f"eval_{k}": v for k, v in self._boundary_values.items()})

    def _boundary(self, host: HFHost) -> None:
        if self._evaluated_at == host.step:
            return  # another evaluation dataset at this step: the same boundary
        self._evaluated_at = host.step
        self._collecting = self._boundary_values = {}
        from ._rng import isolated_rng

        try:
            with isolated_rng():  # the training run's random streams are not the monitors'
                for engine in self.engines:
                    with engine.relay.contain(f"the boundary at step {host.step}"):
                        engine.boundary(host)
        finally:
            self._collecting = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self._training:
            return
        host = self._host(args, state, control, model)
        if self._evaluated_at is None:  # no evaluation ran: one boundary at the end
            self._boundary(host)
        self.fisher.finish()
        self._release()

    def _release(self) -> None:
        self._training = False
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.fisher.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()

    # ------------------------------------------------------------------ reporting
    def _connect(self, args: TrainingArguments) -> None:
        """The report_to integrations of this Trainer (from its callback handler) and the sinks of
        their W&B run and TensorBoard writer, plus PNG/CSV files under the output dir."""
        handler = _calling_handler()
        callbacks = handler.callbacks if handler is not None else []
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        self._integrations = [cb for cb in callbacks if isinstance(cb, kinds)]
        self.sinks = [FolderSink(Path(args.output_dir) / "fisher_callbacks")]
        for cb in self._integrations:
            name = type(cb).__name__
            if name == "TensorBoardCallback":
                self.sinks.append(TensorBoardSink(lambda cb=cb: cb.tb_writer, log_scalars=False))
            elif name == "WandbCallback":
                self.sinks.append(WandbSink(_wandb_run, "train/global_step", log_scalars=False))
        if handler is None:
            log.warning(
                "fisher_callbacks: FisherTrainerCallback was not called by a Trainer's callback "
                "handler: scalars go to state.log_history and files only"
            )

    # ------------------------------------------------------------------ state
    def on_save(self, args, state, control, **kwargs):
        """Every engine's state beside the Trainer's checkpoint (``checkpoint-{step}/``
        :data:`STATE_FILE`, rank zero), so ``train(resume_from_checkpoint=...)`` resumes the
        monitors too (their anchor, histories, Fisher sums and store). Under FSDP2 every rank
        takes the state (the engines gather every rank's shards, a collective)."""
        collector = self.fisher.collector
        sharded = collector is not None and collector.shards.sharded
        if not self._training or not (sharded or state.is_world_process_zero):
            return
        saved = self.state_dict()  # under FSDP2 on every rank
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(saved, folder / STATE_FILE)
        except Exception as err:  # monitoring never takes the run down
            where = f"checkpoint-{state.global_step}"
            self.fisher.relay.warn(f"the monitors' state was not saved with {where} ({err!r})")

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """A run resumed at ``state.global_step``: the monitors' state saved with that checkpoint."""
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if self._loaded:  # restored by hand (load_state_dict) before train
            return
        if not path.is_file():
            self.fisher.relay.warn(
                f"resumed at step {state.global_step} without {path}: the monitors restart here "
                "(a new forgetting anchor at the resumed weights)"
            )
            return
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def state_dict(self) -> dict[str, Any]:
        """Every engine's state (``torch.save`` it to resume the monitors with a run)."""
        return {type(e).__name__: e.state_dict() for e in self.engines}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._loaded = True
        for engine in self.engines:
            if type(engine).__name__ in state:
                engine.load_state_dict(state[type(engine).__name__])


def _eval_strategy(args: Any) -> str:
    """``args.eval_strategy`` as its string (``"no"``, ``"steps"``, ``"epoch"``), enum or not."""
    return str(getattr(args.eval_strategy, "value", args.eval_strategy))


def _calling_handler() -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` that dispatches the current event (up the call stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _wandb_run() -> Any:
    """The W&B run the Trainer's ``WandbCallback`` started (``wandb.run``)."""
    import wandb

    return wandb.run


def fsdp_not_applied(args: Any, model: torch.nn.Module) -> bool:
    """``args.fsdp`` asks for FSDP but ``model`` holds no FSDP2-sharded parameter: what
    accelerate leaves on CPU, where it keeps DDP and drops the FSDP plugin without a word."""
    return bool(getattr(args, "fsdp", None)) and sharding_of(model) != "fsdp2"
