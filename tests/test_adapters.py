"""Adapters: generate protocol (shapes, seeds, stop handling) and lm-eval style log-likelihoods on the tiny preset."""
import pytest, torch
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.tokenizer import train_bpe, stdlib_texts
from phi4_nb.adapters import LocalLM, HFCausalLM, split_pair

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    tok = train_bpe(stdlib_texts(), vocab_size=1024)
    return LocalLM(Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))), tok, batch_size=3)


def full_forward_lp(lm, ctx_ids, cont_ids):
    ids = torch.tensor([list(ctx_ids) + list(cont_ids)])
    with torch.no_grad(): lp = lm.model(ids)[0].float().log_softmax(-1)
    pos = torch.arange(len(ctx_ids) - 1, ids.shape[1] - 1)
    return float(lp[pos, torch.tensor(cont_ids)].sum()), bool((lp[pos].argmax(-1) == torch.tensor(cont_ids)).all())


def test_loglikelihood_matches_full_forward(lm):
    reqs = [("import os\n", "def main():"), ("x = ", "1"), ("class A:\n    ", "pass"), ("", "return None"),
            ("a long context " * 10, " and the end"), ("for i in range(3):", "\n    print(i)")]
    got = lm.loglikelihood(reqs)                       # batch_size 3: several padded batches
    for (c, x), (lp, g) in zip(reqs, got):
        ci, xi = split_pair(lm.tokenizer, c, x, lm.prefix_id)
        ref, rg = full_forward_lp(lm, ci, xi)
        assert abs(lp - ref) < 1e-4 and g == rg


def test_split_pair_like_lm_eval(lm):
    tok = lm.tokenizer
    c, x = split_pair(tok, "Answer: ", "yes", lm.prefix_id)          # trailing space moves to the continuation
    assert tok.decode(c) == "Answer:" and tok.decode(x) == " yes"
    c, x = split_pair(tok, "", "hello", lm.prefix_id)
    assert c == [lm.prefix_id] and tok.decode(x) == "hello"


def test_greedy_continuation_is_greedy(lm):
    ctx = "def f(x):\n"
    out = lm.engine.generate([ctx], __import__("phi4_nb.generate", fromlist=["x"]).SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[]))
    cont = lm.tokenizer.decode(out[0].completions[0].token_ids)
    ids = lm.tokenizer.encode(ctx, add_special_tokens=False)
    [(lp, g)] = lm.loglikelihood_tokens([(ids, out[0].completions[0].token_ids)])
    assert g and lp <= 0


def test_rolling_equals_sum_over_windows(lm):
    text = "def add(a, b):\n    return a + b\n" * 6
    toks = lm.tokenizer.encode(text, add_special_tokens=False)
    [whole] = lm.loglikelihood_rolling([text])
    ref, _ = full_forward_lp(lm, [lm.prefix_id], toks)
    assert abs(whole - ref) < 1e-3
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    lm2 = LocalLM(lm.model, lm.tokenizer, max_length=16)          # several disjoint windows, as lm-eval cuts them
    [win] = lm2.loglikelihood_rolling([text])
    wins = [make_disjoint_window(w) for w in get_rolling_token_windows(toks, lm.prefix_id, 16, 1)]
    assert len(wins) > 2
    ref2 = sum(full_forward_lp(lm, c, x)[0] for c, x in wins)
    assert abs(win - ref2) < 1e-3 and abs(win - ref) > 1e-3


def test_generate_protocol(lm):
    prompts = ["def f(x):", [dict(role="user", content="hi")], "import"]
    a = lm.generate(prompts, n=3, temperature=0.5, max_tokens=6, seed=[1, 2, 3])
    assert [len(o) for o in a] == [3, 3, 3] and all(isinstance(t, str) for o in a for t in o)
    b = lm.generate(prompts[::-1], n=3, temperature=0.5, max_tokens=6, seed=[3, 2, 1])
    assert a == b[::-1]                                           # per-prompt seeds: batch order does not matter
    c = lm.generate(prompts[:1], n=3, temperature=0.5, max_tokens=6, seed=[1])
    assert c[0] == a[0]
    g = lm.generate(prompts, n=2, temperature=0.0, max_tokens=6, seed=None)
    assert all(o[0] == o[1] for o in g)
    with pytest.raises(ValueError): lm.generate(prompts, seed=[1])


def test_stop_strings_and_tokens_removed(lm):
    [[full]] = lm.generate(["class"], n=1, temperature=0.0, max_tokens=12, chat=False)
    if len(full) > 2:
        s = full[1:3]
        [[cut]] = lm.generate(["class"], n=1, temperature=0.0, max_tokens=12, chat=False, stop=[s])
        assert s not in cut and full.startswith(cut)
    eos = lm.tokenizer.eos_token
    assert all(eos not in t for o in lm.generate(["x"] * 2, n=2, temperature=1.0, max_tokens=20) for t in o)


def test_hf_adapter_agrees_with_local(lm, tmp_path):
    from transformers import AutoModelForCausalLM
    lm.model.save_hf(tmp_path)
    hf = HFCausalLM(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), lm.tokenizer)
    reqs = [("import os\n", "def main():"), ("", "x = 1")]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), hf.loglikelihood(reqs)):
        assert abs(a - b) < 1e-3 and ga == gb
    assert hf.generate(["def"], n=1, temperature=0.0, max_tokens=5, chat=False) == lm.generate(["def"], n=1, temperature=0.0, max_tokens=5, chat=False)
    assert [len(o) for o in hf.generate(["a", "b"], n=2, temperature=0.5, max_tokens=4)] == [2, 2]


def test_bad_inputs(lm, tmp_path):
    with pytest.raises(FileNotFoundError): LocalLM.from_path(tmp_path / "nope")
    with pytest.raises(ValueError): lm.loglikelihood_tokens([([1, 2], [])])
    with pytest.raises(ValueError): LocalLM(lm.model, None)
