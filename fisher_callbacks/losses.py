"""Per-sample losses and the scale that turns a batched training gradient into per-sample gradients.

Conventions (DESIGN section 2): the loss of sample i, ``l_i``, is the mean over sample i's OWN target
tokens: causal LM uses labels shifted by one with ``-100`` ignored, masked LM the positions whose
label is not ``-100``, sequence classification the cross-entropy of its label (MSE for a regression
head with ``num_labels == 1``).
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossType = Literal["causal_lm", "masked_lm", "sequence_classification"]
Reduction = Literal["token_mean", "sample_mean", "sum", "token_sum"]
LOSS_TYPES: tuple[str, ...] = ("causal_lm", "masked_lm", "sequence_classification")
REDUCTIONS: tuple[str, ...] = ("token_mean", "sample_mean", "sum", "token_sum")
IGNORE_INDEX = -100


def infer_loss_type(model: nn.Module) -> LossType:
    """Guess the loss from the Hugging Face head class inside ``model`` (causal LM by default)."""
    for module in model.modules():
        name = type(module).__name__
        if "ForSequenceClassification" in name:
            return "sequence_classification"
        if "ForMaskedLM" in name:
            return "masked_lm"
        if "ForCausalLM" in name or "LMHeadModel" in name:
            return "causal_lm"
    return "causal_lm"


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def target_token_counts(labels: torch.Tensor, loss_type: LossType) -> torch.Tensor:
    """``[B]`` number of target tokens of each sample (1 per sample for classification)."""
    _check_loss_type(loss_type)
    if loss_type == "sequence_classification":
        return torch.ones(labels.shape[0], dtype=torch.long, device=labels.device)
    targets = labels[:, 1:] if loss_type == "causal_lm" else labels
    return (targets != IGNORE_INDEX).flatten(1).sum(1)


def is_squared_error(logits: torch.Tensor, labels: torch.Tensor, loss_type: LossType) -> bool:
    """Whether :func:`per_sample_loss` takes the squared error (a one-logit regression head with
    float targets) rather than a cross-entropy (a log-loss)."""
    return loss_type == "sequence_classification" and logits.shape[-1] == 1 and labels.is_floating_point()


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_type: LossType
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's own mean loss.

    Args:
        logits: ``[B, T, V]`` (LM) or ``[B, C]`` (classification; ``[B, 1]`` regression).
        labels: ``[B, T]`` token ids with ``-100`` ignored, or ``[B]`` class ids / targets.
        loss_type: ``"causal_lm"`` (labels shifted by one inside), ``"masked_lm"`` or
            ``"sequence_classification"``.

    Returns:
        ``(losses [B] fp32, counts [B])``; a sample with no target token has loss 0 and count 0.
    """
    _check_loss_type(loss_type)
    if loss_type == "sequence_classification":
        if is_squared_error(logits, labels, loss_type):
            losses = (logits.squeeze(-1).float() - labels.float()) ** 2
        else:
            losses = F.cross_entropy(logits.float(), labels.long(), reduction="none")
        return losses, torch.ones_like(losses, dtype=torch.long)
    if loss_type == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    tok = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).long(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)  # [B, T]
    counts = (labels != IGNORE_INDEX).sum(1)
    return tok.sum(1) / counts.clamp_min(1), counts


def sample_true_labels(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_type: LossType,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution ("true" Fisher).

    Every position that has a target in ``labels`` gets a token sampled from
    ``softmax(logits)`` at the position that predicts it (shifted for causal LM); ignored positions
    stay ``-100``. Sampling runs on the CPU with ``generator``, so a seeded generator reproduces it.

    Returns:
        Tensor like ``labels``.
    """
    _check_loss_type(loss_type)
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    if loss_type == "sequence_classification":
        if logits.shape[-1] == 1:
            raise ValueError("the true Fisher of a regression head is not defined here")
        return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(labels.device)
    if loss_type == "causal_lm":
        probs = probs[:, :-1]
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    drawn = drawn.view(probs.shape[:-1]).to(labels.device)
    new = labels.clone()
    target = new[:, 1:] if loss_type == "causal_lm" else new
    mask = target != IGNORE_INDEX
    target[mask] = drawn[mask]
    return new


def reduction_scale(
    labels: torch.Tensor,
    loss_type: LossType,
    reduction: Reduction = "token_mean",
    accumulate_grad_batches: int = 1,
    loss_scale: float = 1.0,
) -> torch.Tensor:
    """``[B]`` factors s_i with ``grad l_i = s_i * (sample i's part of the training gradient)``.

    The training loss is ``L = loss_scale * R(l) / accumulate_grad_batches`` with ``R``:

    - ``"token_mean"``: ``sum_i n_i l_i / N`` (Hugging Face's default, ``N = sum_i n_i``) ->
      ``s_i = N / n_i``;
    - ``"sample_mean"``: ``mean_i l_i`` -> ``s_i = B``;
    - ``"sum"``: ``sum_i l_i`` -> ``s_i = 1``;
    - ``"token_sum"``: ``sum_i n_i l_i`` -> ``s_i = 1 / n_i``;

    each multiplied by ``accumulate_grad_batches / loss_scale``. Samples without targets get 0.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    counts = target_token_counts(labels, loss_type).double()
    valid = counts > 0
    if reduction == "token_mean":
        scale = counts.sum() / counts.clamp_min(1)
    elif reduction == "sample_mean":
        scale = torch.full_like(counts, float(labels.shape[0]))
    elif reduction == "sum":
        scale = torch.ones_like(counts)
    else:
        scale = 1.0 / counts.clamp_min(1)
    scale = scale * (accumulate_grad_batches / float(loss_scale))
    return torch.where(valid, scale, torch.zeros_like(scale)).float()


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The entries of ``batch`` that ``model.forward`` accepts, without ``labels``."""
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    keep = {k: v for k, v in batch.items() if k != "labels" and (k in params)}
    if not keep and takes_kwargs:
        keep = {k: v for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
    return keep


def forward_logits(model: nn.Module, batch: dict) -> torch.Tensor:
    """Run ``model`` on ``batch`` (labels withheld) and return its logits."""
    out = model(**model_inputs(model, batch))
    logits = out.logits if hasattr(out, "logits") else out
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not torch.is_tensor(logits):
        raise TypeError(f"cannot find logits in the output of {type(model).__name__}")
    return logits


def per_sample_losses(model: nn.Module, batch: dict, loss_type: LossType | None = None) -> torch.Tensor:
    """``[B]`` each sample's own mean loss under ``model`` (forward only, current mode)."""
    if "labels" not in batch:
        raise ValueError("the batch has no 'labels': per-sample losses need targets")
    loss_type = loss_type or infer_loss_type(model)
    losses, _ = per_sample_loss(forward_logits(model, batch), batch["labels"], loss_type)
    return losses
