"""Sharded training: FSDP2 (Lightning's ModelParallelStrategy, 2 CPU processes, gloo) gives every
Fisher and QK-OV value of the same seeded DDP fit, with one clear line for the forgetting monitor;
DeepSpeed ZeRO-3 and FSDP1 are refused at set-up with what is supported (they cannot run on CPU:
their parameters are imitated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_run import run_ddp_script
from tiny_models import tiny_causal_lm

from fisher_callbacks.callbacks import FisherMonitor
from fisher_callbacks.engine.sharding import check_supported, sharding_of

SCRIPT = Path(__file__).parent / "fsdp2_script.py"


def test_fsdp2_gives_the_fisher_and_qkov_of_ddp(tmp_path):
    runs = {}
    for kind in ("ddp", "fsdp2"):
        out = tmp_path / f"{kind}.pt"
        run_ddp_script(SCRIPT, kind, out, cwd=tmp_path)
        runs[kind] = torch.load(out, weights_only=False)
    ddp, fsdp = runs["ddp"], runs["fsdp2"]
    assert fsdp["traces"] == pytest.approx(ddp["traces"], rel=1e-5)
    keys = [k for k in ddp["metrics"] if k.startswith(("fisher/", "qkov/"))]
    assert any(k.startswith("qkov/") for k in keys) and any(k.startswith("fisher/general") for k in keys)
    for key in keys:
        assert fsdp["metrics"][key] == pytest.approx(ddp["metrics"][key], rel=1e-4, abs=1e-6), key
    assert fsdp["metrics"]["train/loss"] == pytest.approx(ddp["metrics"]["train/loss"], rel=1e-5)
    assert not any(k.startswith("forgetting/") for k in fsdp["metrics"])
    told = [w for w in fsdp["warnings"] if "FSDP2" in w]
    assert len(told) == 1 and "forgetting is not watched" in told[0]
    assert not any("DTensor" in w or "sharding strategy" in w for w in fsdp["all_warnings"])


def _imitate(model, attribute: str, value) -> torch.nn.Module:
    for p in model.parameters():
        setattr(p, attribute, value)
    return model


@pytest.mark.parametrize(
    ("attribute", "value", "kind", "says"),
    [("ds_shape", (32, 32), "zero3", "ZeRO-3"), ("_is_flat_param", True, "fsdp1", "FSDP1")],
)
def test_zero3_and_fsdp1_are_refused_with_what_is_supported(attribute, value, kind, says):
    model = _imitate(tiny_causal_lm("gpt2"), attribute, value)
    assert sharding_of(model) == kind
    with pytest.raises(ValueError, match=says) as err:
        check_supported(model)
    assert "FSDP2" in str(err.value) and "DDP" in str(err.value)
    assert sharding_of(tiny_causal_lm("gpt2")) is None


def test_an_unsupported_sharding_keeps_the_suite_out_with_required_false():
    from fisher_callbacks.engine.host import Host

    class _Host(Host):
        def __init__(self, module):
            self.module, self.step = module, 0

        def log_scalars(self, values, *, sync_dist=False, rank_zero_only=False):
            pass

        def request_stop(self):
            pass

    model = _imitate(tiny_causal_lm("gpt2"), "ds_shape", (1,))
    strict = FisherMonitor("train", capture_every_n_steps=1)
    with pytest.raises(ValueError, match="ZeRO-3"):
        strict.prepare(_Host(model), probe_gradients_wanted=False)
    lenient = FisherMonitor("train", capture_every_n_steps=1, required=False)
    with pytest.warns(UserWarning, match="stays out of this fit.*ZeRO-3"):
        lenient.prepare(_Host(model), probe_gradients_wanted=False)
        lenient.relay.flush()
    assert not lenient.active
