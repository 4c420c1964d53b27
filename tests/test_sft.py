"""SFT against TRL: the same model, batch and settings through TRL's `SFTTrainer.compute_loss` and through ours give the
same masked loss and the same gradients; packing changes no example's loss.

Run: pytest tests/test_sft.py
"""
import pytest, torch
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.tokenizer import train_bpe, stdlib_texts, render_chat
from phi4_nb.train import lm_loss
from phi4_nb.sft import sft_example, pack, SFTLoader

trl = pytest.importorskip("trl")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tok(): return train_bpe(stdlib_texts()[:20], vocab_size=1024)


def _convs(n=6):
    return [[dict(role="user", content=f"What is {a} times {a + 1}?"), dict(role="assistant", content=f"{a * (a + 1)}.")]
            for a in range(n)]


def test_masked_loss_and_gradients_equal_trl(tok, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    torch.manual_seed(0)
    Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))).save_hf(tmp_path/"m", tokenizer=tok)
    load = lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path/"m"), dtype=torch.float32)
    rows = [dict(prompt=render_chat(c[:1], add_generation_prompt=True), completion=c[1]["content"] + "<|im_end|>")
            for c in _convs()]
    args = SFTConfig(output_dir=str(tmp_path/"out"), report_to=[], per_device_train_batch_size=6, use_cpu=True,
                     bf16=False, max_length=None, packing=False)
    trainer = SFTTrainer(model=load(), args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    ours_m = Phi4ForCausalLM.from_hf(load()).train()
    ids, keep = batch["input_ids"], (batch["labels"] != -100).long()              # TRL masks with -100 labels
    ours, n = lm_loss(ours_m, dict(input_ids=ids[:, :-1], labels=ids[:, 1:], loss_mask=keep[:, 1:]))
    ours.backward()
    assert n > 0 and ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    g_theirs = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}
    common = [(k, p.grad) for k, p in ours_m.named_parameters() if p.grad is not None and k in g_theirs]
    assert len(common) >= 5
    for k, g in common: torch.testing.assert_close(g, g_theirs[k], rtol=2e-4, atol=2e-6)
    # the same conversations through our chat encoding predict the same assistant tokens TRL masks in (TRL's loader
    # shuffles: compare the sets of rows)
    said = lambda ex: [l for l, m in zip(ex["labels"], ex["loss_mask"]) if m]
    assert sorted(said(sft_example(tok, c)) for c in _convs()) == sorted(r[k.bool()].tolist() for r, k in zip(ids, keep))


def test_packing_changes_no_loss(tok):
    exs = [sft_example(tok, c) for c in _convs(8)]
    torch.manual_seed(0)
    m = Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))).eval()
    with torch.no_grad():
        packed, n = lm_loss(m, pack(exs, 96))
        alone = [lm_loss(m, pack([e], len(e["input_ids"]))) for e in exs]
    assert len(pack(exs, 96)["input_ids"]) < len(exs)                       # several per row
    assert packed.item() == pytest.approx(sum(l.item() * k for l, k in alone) / sum(k for _, k in alone), rel=1e-5)


def test_loader_resumes_and_shards(tok):
    exs = [sft_example(tok, c) for c in _convs(12)]
    L = SFTLoader(exs, 48, batch_rows=2, seed=3)
    L.next_batch(); s = L.state_dict(); want = L.next_batch()
    L2 = SFTLoader(exs, 48, batch_rows=2, seed=3); L2.load_state_dict(s)
    assert torch.equal(L2.next_batch()["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="other data"): SFTLoader(exs[:5], 48, 2, seed=3).load_state_dict(s)
    a, b = SFTLoader(exs, 48, 2, rank=0, world_size=2), SFTLoader(exs, 48, 2, rank=1, world_size=2)
    assert set(a._order(0)).isdisjoint(b._order(0)) and len(a._order(0)) + len(b._order(0)) == 12


def test_a_transformers_checkpoint_fine_tunes_with_sft_and_dpo_and_goes_back(tmp_path):
    """SmolLM2-135M-Instruct (a Llama-family checkpoint): SFT in its own chat template, then DPO, on our trainer; the
    result saves as a Hugging Face checkpoint that transformers loads and generates with."""
    from transformers import AutoModelForCausalLM
    from phi4_nb.model import smollm2_checkpoint
    from phi4_nb.tokenizer import load_tokenizer
    from phi4_nb.train import Trainer, TrainConfig, read_log
    from phi4_nb.dpo import RefLogps, PairLoader, DPOLoss, tokenize_pair
    src = smollm2_checkpoint()
    tok, model = load_tokenizer(src), Phi4ForCausalLM.from_hf(src, dtype=torch.float32)
    convs = [[dict(role="user", content=f"Say the number {k}."), dict(role="assistant", content=f"{k}")] for k in range(4)]
    exs = [sft_example(tok, c, chat_template="tokenizer") for c in convs]
    assert all(tok.decode([l for l, m in zip(e["labels"], e["loss_mask"]) if m]).startswith(str(k))
               for k, e in enumerate(exs))
    cfg = TrainConfig(steps=4, warmup_steps=1, lr=2e-5, ckpt_every=4, weight_decay=0.0)
    Trainer(model, SFTLoader(exs, 64, batch_rows=2, pad_id=tok.pad_token_id or 0), cfg, tmp_path/"sft",
            progress=False).fit()
    log = read_log(tmp_path/"sft")
    assert log[-1]["loss"] < log[0]["loss"]
    ref = Phi4ForCausalLM.from_hf(src, dtype=torch.float32)
    ref.load_state_dict(model.state_dict())
    pairs = [tokenize_pair(tok, dict(prompt=f"{k} + 1 =", chosen=f" {k + 1}", rejected=f" {k + 2}")) for k in range(4)]
    loader = PairLoader(pairs, RefLogps(ref, tmp_path/"ref.sqlite", pad_id=tok.pad_token_id or 0), batch_size=2)
    Trainer(model, loader, TrainConfig(steps=3, warmup_steps=1, lr=2e-5, ckpt_every=3, weight_decay=0.0),
            tmp_path/"dpo", loss_fn=DPOLoss(beta=0.1), progress=False).fit()
    dpo = read_log(tmp_path/"dpo")
    assert dpo[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and dpo[-1]["loss"] < dpo[0]["loss"]
    model.eval().save_hf(tmp_path/"hf", tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path/"hf"), dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
        out = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
