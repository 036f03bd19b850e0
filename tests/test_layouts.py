"""Layouts: every family maps, slices partition each weight, and cutting a head's output kills
exactly that head's Q/K/V gradients (the KV head only when its whole group is cut)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from tiny_models import CAUSAL, ENCODER, lm_batch, tiny_causal_lm, tiny_masked_lm
from torch import nn

import fisher_callbacks as fc
from fisher_callbacks.layouts import BLOCKS

ALL = list(CAUSAL) + list(ENCODER)


def _model(name):
    return tiny_causal_lm(name) if name in CAUSAL else tiny_masked_lm(name)


@pytest.mark.parametrize("name", ALL)
def test_layout_maps_family(name):
    model = _model(name)
    layout = fc.AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    assert layout.num_layers == 2
    assert layout.num_heads == 4
    expected_kv = {"llama": 2, "mistral": 2, "qwen2": 2, "phi3": 2, "falcon_new": 2}
    expected_kv.update({"llama_mqa": 1, "gemma": 1, "falcon_mqa": 1})
    assert layout.num_kv_heads == expected_kv.get(name, 4)
    assert layout.head_dim == (12 if name == "gemma" else 8)
    for layer in range(layout.num_layers):
        names = layout.param_names(layer)
        assert set(names) == set(BLOCKS)
        assert all(n in params for n in names.values())
    assert fc.QKOVConfig is fc.AttentionLayout


@pytest.mark.parametrize("name", ALL)
def test_head_slices_partition_each_weight(name):
    model = _model(name)
    layout = fc.AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    for layer in range(layout.num_layers):
        covered: dict[str, list[torch.Tensor]] = {}
        for block in BLOCKS:
            pname = layout.param_names(layer)[block]
            index_map = torch.arange(params[pname].numel()).view(params[pname].shape)
            heads = (
                range(layout.num_heads)
                if block in ("Q", "O")
                else [h * layout.kv_group_size for h in range(layout.num_kv_heads)]
            )
            for head in heads:
                piece = layout.head_slice(index_map, layer, head, block)
                assert piece.shape[layout.spec(layer, block).axis] == layout.head_dim
                covered.setdefault(pname, []).append(piece.flatten())
        for pname, pieces in covered.items():
            flat = torch.cat(pieces)
            assert flat.numel() == flat.unique().numel(), f"{pname}: slices overlap"
            assert flat.numel() == params[pname].numel(), f"{pname}: slices do not cover it"


@pytest.mark.parametrize("name", ALL)
def test_head_view_matches_head_slice(name):
    model = _model(name)
    layout = fc.AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    for block in BLOCKS:
        pname = layout.param_names(1)[block]
        t = torch.randn(3, *params[pname].shape)  # leading dim kept
        view = layout.head_view(t, 1, block)
        assert view.shape[:2] == (3, layout.heads_in_block(block))
        for head in range(layout.num_heads):
            bh = layout.block_head(head, block)
            sl = layout.head_slice(t, 1, head, block)
            assert torch.equal(view[:, bh].sort(-1).values, sl.reshape(3, -1).sort(-1).values)


@pytest.mark.parametrize("name", ALL)
def test_cutting_head_output_zeroes_its_qkv_gradients(name):
    """Zero the O slices of every query head served by KV head g: the Q slices of those heads and
    the K/V slices of KV head g get exactly zero gradient; every other head does not."""
    model = _model(name)
    layout = fc.AttentionLayout.from_model(model)
    params = dict(model.named_parameters())
    layer, g = 0, layout.num_kv_heads - 1
    cut = [h for h in range(layout.num_heads) if layout.kv_head(h) == g]
    with torch.no_grad():
        o = params[layout.param_names(layer)["O"]]
        for h in cut:
            idx_map = torch.zeros_like(o, dtype=torch.bool)
            layout.head_slice(idx_map, layer, h, "O").fill_(True)
            o.masked_fill_(idx_map, 0.0)
    batch = lm_batch(batch=3, seq=8)
    if name in ENCODER:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = fc.per_sample_gradients(model, batch, layout)
    for block in ("Q", "K", "V"):
        g_total = grads[layout.param_names(layer)[block]].sum(0)
        for h in range(layout.num_heads):
            norm = layout.head_slice(g_total, layer, h, block).abs().sum().item()
            if h in cut:
                assert norm == 0.0, f"{block} head {h} still gets gradient {norm}"
            else:
                assert norm > 0.0, f"{block} head {h} gets no gradient"


class _Wrapper(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = tiny_causal_lm("llama")


def test_layout_inside_lightning_module_uses_wrapper_names():
    wrapper = _Wrapper()
    layout = fc.AttentionLayout.from_model(wrapper)
    names = dict(wrapper.named_parameters())
    assert layout.param_names(0)["Q"] == "net.model.layers.0.self_attn.q_proj.weight"
    assert all(n in names for n in layout.monitored_parameters())
    grads = fc.per_sample_gradients(wrapper.net, lm_batch(batch=2))
    assert len(grads) == len(layout.monitored_parameters())


class NanoAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.n_head = n_head

    def forward(self, x):  # [B, T, d]
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class NanoGPT(nn.Module):
    """nanoGPT-shaped model with no Hugging Face config."""

    model_type = "nanogpt_test"

    def __init__(self, vocab=32, d=16, n_head=2, n_layer=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(NanoAttention(d, n_head) for _ in range(n_layer))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        x = self.wte(input_ids)
        for blk in self.blocks:
            x = x + blk(x)
        return self.lm_head(x)


def build_nanogpt(model):
    layers = [
        {
            "Q": f"blocks.{i}.c_attn",
            "K": f"blocks.{i}.c_attn",
            "V": f"blocks.{i}.c_attn",
            "O": f"blocks.{i}.c_proj",
        }
        for i in range(len(model.blocks))
    ]
    return fc.AttentionLayout.from_projections(model, layers, num_heads=2, fused="concat")


def test_register_layout_for_custom_model():
    fc.register_layout("nanogpt_test", build_nanogpt, overwrite=True)
    model = NanoGPT()
    layout = fc.AttentionLayout.from_model(model)
    assert layout.model_type == "nanogpt_test"
    assert layout.param_names(1) == {
        "Q": "blocks.1.c_attn.weight",
        "K": "blocks.1.c_attn.weight",
        "V": "blocks.1.c_attn.weight",
        "O": "blocks.1.c_proj.weight",
    }
    # head 1 of K is rows [16 + 8, 16 + 16) of the Linear weight [48, 16]
    idx = torch.arange(48 * 16).view(48, 16)
    assert torch.equal(layout.head_slice(idx, 0, 1, "K"), idx[24:32])
    assert torch.equal(layout.head_slice(idx[:16, :16], 0, 1, "O"), idx[:16, 8:16])
    ids = torch.randint(0, 32, (3, 6))
    batch = {"input_ids": ids, "labels": ids}
    grads = fc.per_sample_gradients(model, batch, loss_type="causal_lm")
    assert grads["blocks.0.c_attn.weight"].shape == (3, 48, 16)
    with pytest.raises(ValueError, match="already registered"):
        fc.register_layout("nanogpt_test", lambda m: None)


def test_unknown_model_error_names_type_registry_and_howto():
    class Mystery(nn.Module):
        model_type = "mystery_arch"

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(fc.LayoutError) as err:
        fc.AttentionLayout.from_model(Mystery())
    msg = str(err.value)
    assert "mystery_arch" in msg
    assert "gpt2" in msg and "llama" in msg
    assert "register_layout" in msg
    with pytest.raises(fc.LayoutError, match="Linear"):
        fc.AttentionLayout.from_model(nn.Linear(2, 2))


def test_bad_block_and_shape_errors():
    layout = fc.AttentionLayout.from_model(tiny_causal_lm("gpt2"))
    with pytest.raises(ValueError, match="block"):
        layout.param_names(0) and layout.head_slice(torch.zeros(32, 96), 0, 0, "X")
    with pytest.raises(ValueError, match="does not end with the shape"):
        layout.head_slice(torch.zeros(5, 5), 0, 0, "Q")
    with pytest.raises(IndexError):
        layout.head_slice(torch.zeros(32, 96), 0, 4, "Q")


# ---------------------------------------------------------------------- sanity (issue 11)
def test_from_projections_checks_every_width_against_heads_times_head_dim():
    model = NanoGPT(d=16, n_head=2)
    layers = [
        {"Q": "blocks.0.c_attn", "K": "blocks.0.c_attn", "V": "blocks.0.c_attn", "O": "blocks.0.c_proj"}
    ]
    with pytest.raises(fc.LayoutError, match=r"48 output features, not a multiple of .* 5 \+ 2 \* 5"):
        fc.AttentionLayout.from_projections(model, layers, num_heads=5, fused="concat")
    model.blocks[0].c_proj = nn.Linear(12, 16)  # O takes 12 inputs, but 2 heads x 8 = 16
    with pytest.raises(
        fc.LayoutError, match=r"O projection 'blocks.0.c_proj' has 12 input features.*2 \* 8 = 16"
    ):
        fc.AttentionLayout.from_projections(model, layers, num_heads=2, fused="concat")
    llama = tiny_causal_lm("llama")  # 4 heads of 8, 2 KV heads: K/V 16 wide
    sep = [{b: f"model.layers.0.self_attn.{p}_proj" for b, p in zip("QKVO", "qkvo")}]
    with pytest.raises(
        fc.LayoutError, match=r"K projection .* 16 output features, but num_kv_heads \* head_dim = 4"
    ):
        fc.AttentionLayout.from_projections(llama, sep, num_heads=4, num_kv_heads=4)


def test_registered_type_without_what_the_builder_needs_says_so():
    class Impostor(nn.Module):
        model_type = "llama"  # claims a registered type, has no config and no layers

    with pytest.raises(fc.LayoutError, match=r"claims model_type 'llama'.*cannot map it"):
        fc.AttentionLayout.from_model(Impostor())


def test_unsupported_projection_names_the_module_path_and_hints():
    model = NanoGPT()
    model.blocks[1].c_proj = nn.Conv2d(16, 16, 1)
    fc.register_layout("nanogpt_test", build_nanogpt, overwrite=True)
    with pytest.raises(fc.LayoutError, match=r"'blocks.1.c_proj' of type torch.nn.modules.conv.Conv2d.*peft"):
        fc.AttentionLayout.from_model(model)


def test_include_bias_kept_through_prefixes_and_registered_builders():
    def with_bias(model):
        return build_nanogpt(model)._with_bias()

    fc.register_layout("nanogpt_bias_test", with_bias, overwrite=True)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = NanoGPT()
            self.net.model_type = "nanogpt_bias_test"

    layout = fc.AttentionLayout.from_model(Wrapper())  # the builder's choice survives the prefix
    assert layout.include_bias and "net.blocks.0.c_attn.bias" in layout.monitored_parameters()
    assert not fc.AttentionLayout.from_model(Wrapper(), include_bias=False).include_bias
    gpt2 = fc.AttentionLayout.from_model(tiny_causal_lm("gpt2"), include_bias=True)
    assert gpt2.include_bias and gpt2.renamed(lambda n: f"x.{n}").include_bias
