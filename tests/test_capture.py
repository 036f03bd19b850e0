"""Per-sample gradients from one batched pass equal the micro-batch-1 loop (fp32, rel. err <= 1e-5),
for every family, loss type, training-loss reduction, loss scale and accumulation."""

from __future__ import annotations

import pytest
import torch
from reference import max_rel_error, microbatch_gradients
from tiny_models import CAUSAL, VOCAB, lm_batch, tiny_causal_lm, tiny_classifier, tiny_masked_lm

import fisher_callbacks as fc
from fisher_callbacks.losses import per_sample_loss, reduction_scale, target_token_counts

TOL = 1e-5


@pytest.mark.parametrize("name", list(CAUSAL))
def test_causal_lm_matches_microbatch_loop(name):
    model = tiny_causal_lm(name)
    layout = fc.AttentionLayout.from_model(model)
    batch = lm_batch(batch=4, seq=10)
    got = fc.per_sample_gradients(model, batch, layout)
    ref = microbatch_gradients(model, batch, layout.monitored_parameters())
    assert max_rel_error(got, ref) <= TOL
    assert all(v.dtype == torch.float32 for v in got.values())


def test_right_padding_equals_unpadded_sample():
    model = tiny_causal_lm("gpt2")
    batch = lm_batch(batch=4, seq=12, pad_last=4)
    assert (batch["attention_mask"] == 0).any()
    names = fc.AttentionLayout.from_model(model).monitored_parameters()
    got = fc.per_sample_gradients(model, batch)
    ref = microbatch_gradients(model, batch, names, trim=True)
    assert max_rel_error(got, ref) <= TOL


def test_masked_lm_and_sequence_classification():
    model = tiny_masked_lm("bert")
    batch = lm_batch(batch=3, seq=9)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 2] = batch["input_ids"][:, 2]
    labels[1, 5] = 7
    batch["labels"] = labels
    names = fc.AttentionLayout.from_model(model).monitored_parameters()
    assert (
        max_rel_error(fc.per_sample_gradients(model, batch), microbatch_gradients(model, batch, names)) <= TOL
    )
    for arch in ("bert", "roberta"):
        clf = tiny_classifier(arch, num_labels=3)
        cbatch = {k: v for k, v in lm_batch(batch=3, seq=9).items() if k != "labels"}
        cbatch["labels"] = torch.tensor([0, 2, 1])
        names = fc.AttentionLayout.from_model(clf).monitored_parameters()
        got = fc.per_sample_gradients(clf, cbatch)
        assert max_rel_error(got, microbatch_gradients(clf, cbatch, names)) <= TOL


def test_probe_pass_says_whether_its_losses_are_log_losses():
    """A cross-entropy (the forecast's margin model applies) or a one-logit regression head's
    squared error (it does not): ``ProbeResult.log_loss``, and the losses are those formulas."""
    batch = {k: v for k, v in lm_batch(batch=3, seq=9).items() if k != "labels"}
    clf = tiny_classifier("bert", num_labels=3)
    res = fc.probe_pass(clf, {**batch, "labels": torch.tensor([0, 2, 1])})
    assert res.log_loss and bool((res.losses > 0).all())
    reg = tiny_classifier("bert", num_labels=1)
    targets = torch.tensor([0.5, -1.0, 2.0])
    res = fc.probe_pass(reg, {**batch, "labels": targets})
    with torch.no_grad():
        out = reg(**batch).logits.squeeze(-1)
    assert not res.log_loss
    torch.testing.assert_close(res.losses, (out - targets) ** 2, rtol=1e-5, atol=1e-6)


def test_grad_untouched_mode_kept_and_hooks_removed():
    model = tiny_causal_lm("llama").train()
    fc.per_sample_gradients(model, lm_batch())
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    bad = lm_batch()
    bad["input_ids"] = bad["input_ids"] + VOCAB  # out of range: the forward raises
    with pytest.raises((IndexError, RuntimeError)):
        fc.per_sample_gradients(model, bad)
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training


def _training_loss(logits, labels, reduction):
    losses, counts = per_sample_loss(logits, labels, "causal_lm")
    if reduction == "token_mean":
        return (losses * counts).sum() / counts.sum()
    if reduction == "sample_mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return (losses * counts).sum()


@pytest.mark.parametrize("reduction", ["token_mean", "sample_mean", "sum", "token_sum"])
@pytest.mark.parametrize(("accumulate", "loss_scale"), [(1, 1.0), (4, 1.0), (1, 1024.0), (2, 65536.0)])
def test_training_backward_rescaled_to_per_sample(reduction, accumulate, loss_scale):
    """The caller runs the backward (as Lightning does); arm(scale=...) makes pop() give grad l_i."""
    model = tiny_causal_lm("gpt2")
    layout = fc.AttentionLayout.from_model(model)
    batch = lm_batch(batch=4, seq=10)
    capture = fc.PerSampleGradientCapture(model, layout).attach()
    scale = reduction_scale(batch["labels"], "causal_lm", reduction, accumulate, loss_scale)
    capture.arm(scale=scale)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = _training_loss(logits, batch["labels"], reduction) * loss_scale / accumulate
    loss.backward()
    got = capture.pop()
    capture.remove()
    ref = microbatch_gradients(model, batch, layout.monitored_parameters())
    assert max_rel_error(got, ref) <= TOL


def test_hf_builtin_loss_is_token_mean():
    model = tiny_causal_lm("llama")
    layout = fc.AttentionLayout.from_model(model)
    batch = lm_batch(batch=4, seq=10)
    capture = fc.PerSampleGradientCapture(model, layout).attach()
    capture.arm(scale=reduction_scale(batch["labels"], "causal_lm", "token_mean"))
    model(**batch).loss.backward()
    got = capture.pop()
    ref = microbatch_gradients(model, batch, layout.monitored_parameters())
    assert max_rel_error(got, ref) <= TOL


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # llama: Q, K and V share one selected input
def test_subset_capture_and_disarmed_hooks_cost_nothing(name):
    model = tiny_causal_lm(name)
    layout = fc.AttentionLayout.from_model(model)
    batch = lm_batch(batch=4, seq=10)
    capture = fc.PerSampleGradientCapture(model, layout).attach()
    model(**batch).loss.backward()  # disarmed: nothing kept
    assert capture.pop() == {}
    idx = torch.tensor([3, 1])
    capture.arm(idx, scale=reduction_scale(batch["labels"], "causal_lm", "token_mean")[idx])
    model(**batch).loss.backward()
    got = capture.pop()
    ref = microbatch_gradients(model, batch, layout.monitored_parameters())
    assert max_rel_error(got, {n: r[idx] for n, r in ref.items()}) <= TOL
    with torch.no_grad():
        capture.arm()
        model(**batch)
        assert capture.pop() == {}
    capture.remove()


def test_nonfinite_factor_is_flagged_once_per_step():
    """An inf in an activation that Q, K and V share (checked once for the three) or in an
    output gradient flags the step; a clean step after it is clean again."""
    model = tiny_causal_lm("llama")
    layout = fc.AttentionLayout.from_model(model)
    batch = lm_batch(batch=4, seq=10)
    capture = fc.PerSampleGradientCapture(model, layout).attach()
    idx = torch.tensor([0, 2])
    scale = reduction_scale(batch["labels"], "causal_lm")[idx]

    def poison(module, args, output):
        output = output.clone()
        output[2, 3, 0] = float("inf")  # a captured sample's row of the shared Q/K/V input
        return output

    handle = model.model.layers[1].input_layernorm.register_forward_hook(poison)
    capture.arm(idx, scale=scale)
    model(**batch).loss.backward()
    assert capture.nonfinite
    handle.remove()
    capture.arm(idx, scale=scale)
    model(**batch).loss.backward()
    assert not capture.nonfinite

    def nan_gradient(module, args, output):
        output.register_hook(lambda g: g * float("nan"))  # the gradient reaching o_proj's hook

    grad_hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(nan_gradient)
    capture.arm(idx, scale=scale)
    model(**batch).loss.backward()
    assert capture.nonfinite
    grad_hook.remove()
    capture.remove()


def test_true_fisher_labels_seeded_and_exact():
    model = tiny_causal_lm("gpt2")
    batch = lm_batch(batch=3, seq=8)
    g1 = fc.per_sample_gradients(model, batch, fisher_type="true", generator=torch.Generator().manual_seed(5))
    g2 = fc.per_sample_gradients(model, batch, fisher_type="true", generator=torch.Generator().manual_seed(5))
    emp = fc.per_sample_gradients(model, batch)
    name = next(iter(g1))
    assert torch.equal(g1[name], g2[name])
    assert not torch.allclose(g1[name], emp[name])
    # Same labels drawn again and used as the empirical labels give the same gradients.
    from fisher_callbacks.losses import forward_logits, sample_true_labels

    with torch.no_grad():
        logits = forward_logits(model, batch)
    drawn = sample_true_labels(logits, batch["labels"], "causal_lm", torch.Generator().manual_seed(5))
    assert torch.equal(drawn == -100, batch["labels"] == -100)
    again = fc.per_sample_gradients(model, {**batch, "labels": drawn})
    assert max_rel_error(g1, again) <= TOL


def test_bad_input_errors():
    model = tiny_causal_lm("gpt2")
    batch = lm_batch()
    with pytest.raises(ValueError, match="labels"):
        fc.per_sample_gradients(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="empty"):
        fc.per_sample_gradients(model, {k: v[:0] for k, v in batch.items()})
    with pytest.raises(ValueError, match="fisher_type"):
        fc.per_sample_gradients(model, batch, fisher_type="fancy")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        fc.per_sample_gradients(model, batch)


def test_sample_without_targets_gets_zero_scale():
    labels = torch.tensor([[1, 2, 3], [1, -100, -100]])
    counts = target_token_counts(labels, "causal_lm")
    assert counts.tolist() == [2, 0]
    assert reduction_scale(labels, "causal_lm", "token_mean").tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="reduction"):
        reduction_scale(labels, "causal_lm", "mean")


def test_summed_probe_gradients_equal_autograd_and_leave_grad_as_it_was():
    """``probe_pass(sum_params=..., sum_into=...)`` streams the summed gradients into a running
    sum one parameter at a time (:func:`summed_backward`): equal to ``torch.autograd.grad`` over
    two batches, the training's ``.grad`` tensors put back untouched, zeros for a parameter the
    loss does not reach, and the per-sample gradients unchanged."""
    model = tiny_causal_lm("llama")
    params = dict(model.named_parameters())
    extra = torch.nn.Parameter(torch.ones(3))  # reached by no loss
    sums = {**params, "unused": extra}
    training = {n: torch.randn_like(p) for n, p in params.items()}
    for n, p in params.items():
        p.grad = training[n]
    batches = [lm_batch(batch=3, seq=8, seed=s) for s in (1, 2)]
    total: dict[str, torch.Tensor] = {}
    results = [fc.probe_pass(model, b, sum_params=sums, sum_into=total) for b in batches]
    assert results[1].summed is total
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = per_sample_loss(logits, b["labels"], "causal_lm")[0].sum()
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            ref[n] += g
    assert max_rel_error({n: total[n] for n in params}, ref) <= TOL
    assert torch.equal(total["unused"], torch.zeros(3))
    assert all(p.grad is training[n] for n, p in params.items())
    assert extra.grad is None
    names = fc.AttentionLayout.from_model(model).monitored_parameters()
    per_sample = microbatch_gradients(model, batches[0], names)
    assert max_rel_error(results[0].grads, per_sample) <= TOL
