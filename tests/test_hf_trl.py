"""The suite on TRL's SFTTrainer with a LoRA adapter (the ``trl`` extra): the example runs the whole
suite, and the captured per-sample gradients under TRL's fused LM head equal the micro-batch-1 loop."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")

import torch
from datasets import Dataset
from peft import LoraConfig
from reference import assert_close_rel
from trl import SFTConfig, SFTTrainer

from fisher_callbacks.hf import FisherTrainerCallback
from lightning_examples import hf_sft_lora


def test_sft_lora_example_runs_the_whole_suite(tmp_path):
    trainer, callback = hf_sft_lora.main(steps=20, out=str(tmp_path / "run"))
    assert trainer.state.global_step == 20
    assert type(trainer.model).__name__ == "PeftModel"
    history = callback.forgetting.history["general"]
    assert history["step"] == [10, 20]
    assert history["measured"][-1] > 0  # fine-tuning on "math" erodes "general"
    monitored = callback.fisher.layout.monitored_parameters()
    assert monitored and all("lora_" in n for n in monitored)
    assert callback.fisher.collector.num_samples("math") > 0
    rows = trainer.state.log_history
    for key in ("fisher/math/trace", "qkov/general_vs_math/Q/fisher_overlap", "forgetting/general/predicted"):
        assert any(key in r for r in rows), key
    figures = list((tmp_path / "run" / "fisher_callbacks" / "figures").glob("*.png"))
    assert any("qkov" in p.name for p in figures) and any("forgetting" in p.name for p in figures)
    summary = json.loads(Path(tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == [10, 20]


def fused_microbatch_gradients(model, batch, names):
    """The micro-batch-1 loop with the loss TRL trains on: each sample alone through the fused LM
    head (``log_probs`` of its target tokens, no logits), the gradient of its own mean. (That
    head's gradient differs from the plain logits path's by ~0.5%: the reference is the loss the
    training backward really has.)"""
    params = dict(model.named_parameters())
    out = {n: [] for n in names}
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        log_probs = model(**one, fused_lm_head=True, use_cache=False).log_probs
        loss = -log_probs.sum() / (one["labels"][:, 1:] != -100).sum()
        for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _sft(tmp_path, accumulation: int = 1, loss_type: str = "nll") -> tuple[SFTTrainer, FisherTrainerCallback]:
    """One optimizer step (lr 0) over 8 "math" samples of different lengths, every one captured."""
    tok = hf_sft_lora.tokenizer()
    model = hf_sft_lora.tiny_llama(len(tok))
    callback = FisherTrainerCallback(
        train_task="math", capture_every_n_steps=1, store="exact", max_samples_per_task=8
    )
    texts = hf_sft_lora.texts("math", 8, seed=0)
    # one long sample: whatever the sampler's order, the two micro-batches of GA=2 differ in
    # target tokens, so each one's weight is its tokens over the step's num_items_in_batch
    lengths = [5, 6, 7, 8, 9, 10, 11, 24]
    texts = [" ".join(t.split()[:k]) for t, k in zip(texts, lengths)]
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.0,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,  # TRL's default trains under bf16 autocast; the reference runs in fp32
            max_length=32,
            disable_tqdm=True,
            loss_type=loss_type,
        ),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        callbacks=[callback],
    )
    return trainer, callback


@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_head_capture_equals_the_microbatch_loop(tmp_path, accumulation):
    trainer, callback = _sft(tmp_path, accumulation)
    # every training sample, collated as the trainer does (one optimizer step holds all 8)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    ref_all = fused_microbatch_gradients(trainer.model, batch, names)
    trainer.train()
    _, grads = callback.fisher.collector.stored_gradients("math")
    assert grads
    for name, rows in grads.items():
        ref = ref_all[name]
        assert rows.shape[0] == ref.shape[0] == 8
        # the same samples in some order: compare what does not depend on the order
        assert_close_rel(rows.sum(0), ref.sum(0), rtol=1e-4)
        norms = lambda t: t.flatten(1).norm(dim=1).sort().values  # noqa: E731
        assert_close_rel(norms(rows), norms(ref), rtol=1e-4)


@pytest.mark.parametrize(("loss_type", "warned"), [("nll", False), ("dft", True)])
def test_a_loss_that_weights_tokens_unequally_is_one_warning(tmp_path, loss_type, warned):
    """TRL's ``loss_type="dft"`` weights each target token by its probability: the captured
    gradients are then those of the weighted loss (a Fisher 9.5x the token-mean one in the
    review's run). Before: no warning."""
    trainer, _ = _sft(tmp_path, loss_type=loss_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [w for w in caught if "weights its target tokens unequally" in str(w.message)]
    assert len(said) == int(warned)
