"""Long-context items hit their token budgets, are seeded, and score correctly (SubEM, ICL accuracy/F1)."""
import json, re, pytest, torch
from phi4_nb.tokenizer import train_bpe, stdlib_texts
from phi4_nb.world import TEST_QUESTIONS
from phi4_nb.longctx import json_kv_items, icl_items, longctx_eval, subem, macro_f1, parse_label, fit_parts


@pytest.fixture(scope="module")
def tok(): return train_bpe(stdlib_texts(), vocab_size=1024)


def ntok(tok, s): return len(tok.encode(s, add_special_tokens=False))


@pytest.mark.parametrize("budget", [150, 600, 1500])
def test_json_kv_hits_budget(tok, budget):
    items = json_kv_items(tok, budget, n=5, seed=1)
    for it in items:
        assert it["prompt_tokens"] == ntok(tok, it["prompt"]) <= budget
        assert it["prompt_tokens"] >= budget - 20                      # one more pair would not fit
        doc = json.loads(it["prompt"].split("JSON data:\n")[1].split("\n\nKey:")[0])
        assert doc[it["key"]] == it["answer"] and len(doc) == it["n_keys"]
    d = sorted(it["depth"] for it in items)                             # depths spread over the document
    assert d[0] == 0.0 and d[-1] == 1.0 and all(abs(x - y) < 0.1 for x, y in zip(d, [0, 0.25, 0.5, 0.75, 1]))
    assert items == json_kv_items(tok, budget, n=5, seed=1) and items != json_kv_items(tok, budget, n=5, seed=2)


@pytest.mark.parametrize("budget", [200, 1200])
def test_icl_hits_budget_and_is_balanced(tok, budget):
    items = icl_items(tok, budget, n=4, seed=0)
    for it in items:
        assert it["prompt_tokens"] == ntok(tok, it["prompt"]) <= budget and it["prompt_tokens"] >= budget - 40
        demos = re.findall(r"question: (.*)\nlabel: (\S+)\n", it["prompt"])
        assert len(demos) == it["n_shots"]
        labels = [l for _, l in demos]
        assert max(map(labels.count, set(labels))) - min(map(labels.count, set(labels))) <= 1 or len(set(labels)) < len(TEST_QUESTIONS)
        q = it["prompt"].rsplit("question: ", 1)[1]
        assert q not in [d for d, _ in demos]
    assert len({it["answer"] for it in items}) == 4


def test_metrics():
    assert subem("The value is 4711.", "4711") and not subem("47", "4711") and subem("ABC", "abc")
    assert macro_f1(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert macro_f1(["a", "b"], ["b", "a"]) == 0.0
    assert abs(macro_f1(["a", "a", "b", "b"], ["a", "b", "b", "b"]) - (2 / 3 + 0.8) / 2) < 1e-9
    assert parse_label(" 12\nquestion") == "12" and parse_label("") == ""


class Oracle:
    "Answers JSON KV by parsing the prompt and ICL by a lookup table; says nothing otherwise."
    def __init__(self, tok, table): self.tokenizer, self.table = tok, table
    def generate(self, prompts, n=1, temperature=0.0, max_tokens=8, seed=0, chat=False, stop=None):
        out = []
        for p in prompts:
            if p.startswith("Extract"):
                doc = json.loads(p.split("JSON data:\n")[1].split("\n\nKey:")[0]); key = p.rsplit('Key: "', 1)[1].split('"')[0]
                out.append([f" {doc[key]}"])
            else: out.append([" " + self.table.get(p, "x")])
        return out


def test_eval_scores_oracle_perfectly(tok):
    table = {it["prompt"]: it["answer"] for m in (1, 2) for it in icl_items(tok, m * 200 - 12 - 8, n=3, seed=0)}
    r = longctx_eval(Oracle(tok, table), train_ctx=200, multiples=(1, 2), n=3, max_tokens=12)
    assert all(v.get("subem", v.get("accuracy")) == 1.0 for v in r["results"].values())
    assert r["results"]["icl@2x"]["macro_f1"] == 1.0
    assert r["results"]["json_kv@2x"]["mean_prompt_tokens"] > 1.8 * r["results"]["json_kv@1x"]["mean_prompt_tokens"]
    assert len(r["records"]) == 2 * 2 * 3
    r0 = longctx_eval(Oracle(tok, {}), train_ctx=200, multiples=(1,), n=3, max_tokens=12, tasks=("icl",))
    assert r0["results"]["icl@1x"]["accuracy"] == 0.0


def test_real_model_runs_at_4x(tok):
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    from phi4_nb.adapters import LocalLM
    torch.manual_seed(0)
    m = Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok)))
    ctx = m.config.max_position_embeddings
    r = longctx_eval(LocalLM(m, tok), train_ctx=ctx, multiples=(1, 4), n=1, max_tokens=3)
    assert r["results"]["json_kv@4x"]["mean_prompt_tokens"] > 3 * ctx


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="too small"): json_kv_items(tok, 5, n=1)
    with pytest.raises(ValueError, match="unknown"): longctx_eval(Oracle(tok, {}), 200, tasks=("rag",))
