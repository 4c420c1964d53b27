"""DPO against TRL: the same model, batch and settings through TRL's `DPOTrainer.compute_loss` and through ours give the
same loss and the same gradients, for every loss type we name after TRL's.

Run: pytest tests/test_dpo.py
"""
import pytest, torch
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.tokenizer import train_bpe, stdlib_texts
from phi4_nb.dpo import preference_loss, pair_logps, tokenize_pair, collate_pairs, LOSS_TYPES

trl = pytest.importorskip("trl")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    tok = train_bpe(stdlib_texts()[:20], vocab_size=1024)
    d = tmp_path_factory.mktemp("hf")
    for name, seed in (("policy", 0), ("ref", 1)):
        torch.manual_seed(seed)
        Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))).save_hf(d/name, tokenizer=tok)
    load = lambda n: AutoModelForCausalLM.from_pretrained(str(d/n), dtype=torch.float32)
    pairs = [dict(prompt=f"def f{i}(x):\n    return", chosen=f" x + {i}", rejected=f" x * {i} - 1") for i in range(6)]
    return tok, load, pairs


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2),
                                           ("sigmoid_norm", 0.0)])
def test_loss_and_gradients_equal_trl(setup, tmp_path, loss_type, eps):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok, load, pairs = setup
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], label_smoothing=eps, report_to=[],
                     per_device_train_batch_size=6, use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=load("policy"), ref_model=load("ref"), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(pairs))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()

    ours_m, ref = Phi4ForCausalLM.from_hf(load("policy")), Phi4ForCausalLM.from_hf(load("ref"))
    ours_m.train()
    b = dict(input_ids=batch["input_ids"], completion_mask=batch["completion_mask"])
    c, r, nc, nr = pair_logps(ours_m, b)
    with torch.no_grad(): rc, rr, _, _ = pair_logps(ref, b)
    ours = preference_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                           chosen_tokens=nc, rejected_tokens=nr).mean()
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    g_theirs = {k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}
    g_ours = {k: p.grad for k, p in ours_m.named_parameters() if p.grad is not None}
    common = [k for k in g_ours if k in g_theirs]
    assert len(common) >= len(g_ours) - 1                            # every weight but a tied head has a twin
    for k in common:
        torch.testing.assert_close(g_ours[k], g_theirs[k], rtol=2e-4, atol=2e-6)


def test_our_tokenisation_matches_trls(setup, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    tok, load, pairs = setup
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], per_device_train_batch_size=6, use_cpu=True,
                     bf16=False, max_length=None)
    trainer = DPOTrainer(model=load("policy"), ref_model=load("ref"), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(pairs))
    ds = trainer.train_dataset
    for row, p in zip(ds, pairs):
        assert tokenize_pair(tok, p) == {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_single_token_pairs_are_kept_as_ids():
    p = dict(prompt_ids=[3, 4, 5], chosen_ids=[7], rejected_ids=[8])
    b = collate_pairs([tokenize_pair(None, p)])
    assert b["input_ids"].tolist() == [[3, 4, 5, 7], [3, 4, 5, 8]] and b["completion_mask"][:, -1].tolist() == [1, 1]
    with pytest.raises(ValueError, match="non-empty"): tokenize_pair(None, dict(p, chosen_ids=[]))
    assert set(LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "robust", "sigmoid_norm"}
