"simple-evals protocol pieces, statistics, loaders and the resumable runner (fake generators only)."
import itertools, json, math, os, random, re
from pathlib import Path
import numpy as np
import pytest
from phi4_nb.judges import FakeGenerator, GeneratorJudge, RuleJudge, MixedJudgesError
from phi4_nb.core import data_root, read_jsonl_resume, sha256_json
from phi4_nb.evals import (extract_answer_line, extract_gsm_number, gsm_equal, last_boxed, extract_mc_letter, mc_prompt,
                           extract_code, check_math, pass_at_k, simpleqa_metrics, bootstrap_ci, mean_metric, Items,
                           gsm8k_items, math_items, humaneval_items, MathTask, GSM8KTask,
                           MCTask, HumanEvalTask, SimpleQATask, run_eval, results_table, load_result,
                           item_seed, MATH_TEMPLATE, RESULT_FORMAT)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data")

# ---------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,want", [
    ("...\nAnswer: 42", "42"), ("ANSWER :   x^2 + 1\nmore", "x^2 + 1"), ("answer:\\frac{1}{2}", "\\frac{1}{2}"),
    ("Answer: 1\nAnswer: 2", "1"), ("The answer is 5", None), ("", None)])
def test_extract_answer_line(text, want): assert extract_answer_line(text) == want

@pytest.mark.parametrize("text,want", [
    ("3+4=7\nAnswer: 7", "7"), ("Answer: 1,234", "1234"), ("Answer: 12.50", "12.50"), ("Answer: 7.", "7"),
    ("Answer: 3 apples then 9", "9"), ("Answer: 2\nwait, Answer: 5", "5"), ("no prefix 7", ""), ("Answer: none", ""),
    ("Answer: -5", "5")])                 # simple-evals' pattern has no sign (kept on purpose)
def test_extract_gsm_number(text, want): assert extract_gsm_number(text) == want

def test_gsm_equal():
    assert gsm_equal("18", "18") and gsm_equal("18", "18.00") and gsm_equal("1,000", "1000")
    assert not gsm_equal("18", "180") and not gsm_equal("18", "")

def test_last_boxed():
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{1} then \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed 5$") == "5" and last_boxed("none") is None and last_boxed("\\boxed{unclosed") is None

@pytest.mark.parametrize("text,want", [
    ("Answer: B", "B"), ("**Answer: C**", "C"), ("Answer: $\\boxed{D}$", "D"), ("answer:a", "A"),
    ("The correct option is B", None), ("Answer: E", None), ("Answer: \\text{(A)}", None)])
def test_extract_mc_letter(text, want): assert extract_mc_letter(text) == want

def test_mc_prompt_letters():
    p = mc_prompt("Q?", ["a", "b", "c", "d", "e"])
    assert "one of ABCDE" in p and p.endswith("E) e")

def test_extract_code_modes():
    reply = "Sure!\n```python\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n```\nextra ```python\nnope\n```"
    assert extract_code(reply) == "    return math.sqrt(x)\n"           # first block, def line dropped
    assert "import math" in extract_code(reply, "full")
    with pytest.raises(ValueError): extract_code(reply, "other")

# ---------------------------------------------------------------- math equivalence
@pytest.mark.parametrize("ref,ans,want", [
    ("\\frac{1}{2}", "0.5", True), ("2", "2.0", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("(1,2)", "(1, 2)", True),
    ("x+1", "1+x", True), ("\\frac{\\pi}{3}", "60^\\circ", False), ("5", "6", False), ("3", None, False), ("3", "", False),
    ("10\\%", "10", True), ("\\text{(B)}", "B", True)])
def test_check_math(ref, ans, want): assert check_math("q", ref, ans)[0] == want

def test_equality_judge_is_pluggable_and_recorded(tmp_path):
    judge = GeneratorJudge(FakeGenerator(lambda t, i, r: "Yes"), "always-yes", "equality")
    items = Items([dict(id="a", question="1+1?", answer="2")])
    gen = FakeGenerator(lambda t, i, r: "Answer: two")
    r1 = run_eval(MathTask(judge=judge), gen, "m", items, tmp_path / "j", n=1, progress=False)
    r2 = run_eval(MathTask(), gen, "m", items, tmp_path / "mv", n=1, progress=False)
    assert r1["metrics"]["accuracy"] == 1.0 and r2["metrics"]["accuracy"] == 0.0
    assert r1["judge_ids"]["equality"].startswith("local:always-yes") and r2["judge_ids"]["equality"].startswith("rule:math-verify")
    assert r1["samples"][0]["judge_reply"] == "Yes"
    with pytest.raises(MixedJudgesError): results_table([r1, r2])

# ---------------------------------------------------------------- pass@k
def _brute(n, c, k):
    combos = list(itertools.combinations([1] * c + [0] * (n - c), k))
    return sum(any(x) for x in combos) / len(combos)

def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1): assert math.isclose(pass_at_k(n, c, k), _brute(n, c, k), abs_tol=1e-12)

def test_pass_at_k_stable_and_validated():
    v = pass_at_k(10000, 3, 1000)
    assert math.isclose(v, 1 - math.comb(9997, 1000) / math.comb(10000, 1000), rel_tol=1e-9) and 0 < v < 1
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    for bad in ((5, 6, 1), (5, 2, 6), (5, 2, 0), (5, -1, 1)):
        with pytest.raises(ValueError): pass_at_k(*bad)

# ---------------------------------------------------------------- SimpleQA
def test_simpleqa_metrics_definition():
    m = simpleqa_metrics(20, 20, 60)
    cr, aga = 0.2, 0.5
    assert m["accuracy_given_attempted"] == pytest.approx(aga) and m["f1"] == pytest.approx(2 * cr * aga / (cr + aga))
    assert simpleqa_metrics(0, 0, 10)["f1"] == 0.0 and simpleqa_metrics(0, 0, 10)["accuracy_given_attempted"] == 0.0
    # abstaining more raises precision but lowers the correct rate
    a, b = simpleqa_metrics(30, 30, 40), simpleqa_metrics(30, 10, 60)
    assert b["accuracy_given_attempted"] > a["accuracy_given_attempted"] and a["correct"] == b["correct"]

def tinyworld_simpleqa(n=20):
    "Items shaped like TinyWorld's simpleqa test set (known facts and unknown ones)."
    return Items([dict(id=f"sqa-te-{i:05d}", task="simpleqa", question=f"What is the capital of Land{i}?",
                       answer=f"City{i}", known=i % 2 == 0, fact_id=f"fact-{i}") for i in range(n)])

def test_simpleqa_task_on_tinyworld_items(tmp_path):
    items = tinyworld_simpleqa(20)
    def reply(t, i, r):
        k = int(re.search(r"Land(\d+)", t).group(1))
        if k % 2 == 0: return f"It is City{k}."                 # known: correct
        return "I don't know." if k % 4 == 1 else "It is Cityzen."   # unknown: half abstain, half wrong
    res = run_eval(SimpleQATask(), FakeGenerator(reply), "m", items, tmp_path, n=1, progress=False)
    m = res["metrics"]
    assert (m["correct"], m["not_attempted"], m["incorrect"]) == (0.5, 0.25, 0.25)
    assert m["accuracy_given_attempted"] == pytest.approx(0.5 / 0.75)
    assert res["judge_ids"] == {"simpleqa": "rule:rule_simpleqa/simpleqa-v1"}
    assert {s["grade"] for s in res["samples"]} == {"correct", "incorrect", "not_attempted"}
    lo, hi = res["ci"]["f1"]; assert lo <= m["f1"] <= hi

# ---------------------------------------------------------------- bootstrap
def test_bootstrap_seeded_and_sensible():
    rng = np.random.default_rng(1)
    small, big = rng.integers(0, 2, 50).tolist(), rng.integers(0, 2, 2000).tolist()
    a = bootstrap_ci({"acc": small}, mean_metric, seed=3)
    assert a == bootstrap_ci({"acc": small}, mean_metric, seed=3)
    cont = rng.random(50).tolist()
    assert bootstrap_ci({"x": cont}, mean_metric, seed=3) != bootstrap_ci({"x": cont}, mean_metric, seed=4)
    b = bootstrap_ci({"acc": big}, mean_metric, seed=3)
    assert a["acc"][0] <= np.mean(small) <= a["acc"][1]
    assert (b["acc"][1] - b["acc"][0]) < (a["acc"][1] - a["acc"][0])
    assert bootstrap_ci({"acc": [1.0] * 10}, mean_metric)["acc"] == [1.0, 1.0]

# ---------------------------------------------------------------- data
@needs_data
def test_loaders_real_files():
    g, m = gsm8k_items(root=SHARED), math_items(root=SHARED)
    assert len(g) == 1319 and g.info["file_sha256"] == "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"
    assert len(m) == 5000 and m.info["file_sha256"] == "fab323c7494481b145a89823f02cd5fe9e796ba5e6b770b28a25698630cacbdd"
    assert all(it["answer"] for it in m) and all(re.fullmatch(r"-?\d+", it["answer"]) for it in g)
    assert len({it["id"] for it in g}) == 1319 and len({it["id"] for it in m}) == 5000
    sub = m.subset(limit=10)
    assert len(sub) == 10 and sub.info["file_sha256"] == m.info["file_sha256"] and sub.info["subset"]["limit"] == 10
    assert [it["id"] for it in m.subset(ids=["test/algebra/1"])] == ["test/algebra/1"]

def test_loader_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("PHI4_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="benchmark data folder not found"): data_root(tmp_path / "nope")
    (tmp_path / "gsm8k").mkdir()
    with pytest.raises(FileNotFoundError): gsm8k_items(root=tmp_path)
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{broken\n')
    with pytest.raises(ValueError, match="test.jsonl:2"): gsm8k_items(root=tmp_path)
    monkeypatch.setenv("PHI4_DATA", str(tmp_path))
    assert data_root() == tmp_path

def test_humaneval_items():
    he = humaneval_items()
    assert len(he) == 164 and he[0]["id"] == "HumanEval/0" and len(he.info["file_sha256"]) == 64

# ---------------------------------------------------------------- runner
def arith_items(n=12): return Items([dict(id=f"t{i}", question=f"What is {i} times 3?", answer=str(3 * i)) for i in range(n)],
                                    dict(source="inline", file_sha256=None))

def arith_reply(t, i, rng):
    k = int(re.search(r"What is (\d+)", t).group(1))
    return f"Thinking...\nAnswer: {3 * k if rng.random() < 0.7 else 3 * k + 1}"

class Crashing(FakeGenerator):
    "Dies (like a killed job) on call number `die_at`."
    def __init__(self, reply, die_at): super().__init__(reply); self.die_at = die_at
    def __call__(self, prompts, **kw):
        if self.calls + 1 == self.die_at: raise KeyboardInterrupt("killed")
        return super().__call__(prompts, **kw)

def test_resume_after_kill_no_duplicates(tmp_path):
    items = arith_items(12)
    ref = run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", items, tmp_path / "ref", n=3, batch_size=4, progress=False)
    g1 = Crashing(arith_reply, die_at=3)
    with pytest.raises(KeyboardInterrupt): run_eval(GSM8KTask(), g1, "m", items, tmp_path / "run", n=3, batch_size=4, progress=False)
    spath = tmp_path / "run" / "m" / "gsm8k.samples.jsonl"
    assert len(read_jsonl_resume(spath)) == 8 * 3
    with open(spath, "a") as f: f.write('{"item_id": "t8", "sam')        # a torn line from the kill
    g2 = FakeGenerator(arith_reply)
    res = run_eval(GSM8KTask(), g2, "m", items, tmp_path / "run", n=3, batch_size=5, progress=False)
    assert g2.prompts == 4                                                   # only the missing items were generated
    recs = read_jsonl_resume(spath)
    assert len(recs) == 36 and len({(r["item_id"], r["sample"]) for r in recs}) == 36
    assert res["samples"] == ref["samples"] and res["metrics"] == ref["metrics"] and res["ci"] == ref["ci"]

def test_config_change_refused(tmp_path):
    items = arith_items(4)
    run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", items, tmp_path, n=2, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", items, tmp_path, n=2, temperature=0.7, progress=False)

def test_result_json_format(tmp_path):
    items = arith_items(6)
    res = run_eval(MathTask(), FakeGenerator(arith_reply), "org/model v1", items, tmp_path, n=2, seed=7, progress=False)
    path = tmp_path / "org_model_v1" / "math.json"
    on_disk = load_result(path)
    assert on_disk == json.loads(json.dumps(res))
    for k in ("format", "model", "suite", "protocol", "config", "data", "seeds", "judge_ids", "metrics", "ci", "samples"):
        assert k in on_disk
    assert on_disk["format"] == RESULT_FORMAT and on_disk["config"]["temperature"] == 0.5 and on_disk["config"]["n"] == 2
    assert on_disk["data"]["items_sha256"] == sha256_json(list(items)) and on_disk["seeds"]["base"] == 7
    s = on_disk["samples"][0]
    assert set(s) >= {"item_id", "sample", "seed", "prompt", "completion", "extracted", "correct"}
    assert s["seed"] == item_seed(7, "t0") and s["prompt"][0]["content"] == MATH_TEMPLATE.format(question=items[0]["question"])
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError): load_result(tmp_path / "org_model_v1" / "math.run.json")

def test_seeds_do_not_depend_on_batching(tmp_path):
    items = arith_items(7)
    a = run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", items, tmp_path / "a", n=2, batch_size=2, progress=False)
    b = run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", items, tmp_path / "b", n=2, batch_size=7, progress=False)
    assert a["samples"] == b["samples"]

def test_bad_generator_and_items(tmp_path):
    items = arith_items(3)
    with pytest.raises(ValueError, match="completions"):
        run_eval(GSM8KTask(), lambda p, **k: [["x"]], "m", items, tmp_path, n=1, progress=False)
    with pytest.raises(ValueError, match="unique"):
        run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", Items([items[0], items[0]]), tmp_path / "u", progress=False)
    with pytest.raises(ValueError): run_eval(GSM8KTask(), FakeGenerator(arith_reply), "m", Items([]), tmp_path / "e", progress=False)

def test_mc_task(tmp_path):
    items = Items([dict(id=f"q{i}", question=f"Pick {L}", choices=["w", "x", "y", "z", "None of these"], answer=L)
                   for i, L in enumerate("ABCDE")])
    gen = FakeGenerator(lambda t, i, r: f"Reasoning.\n**Answer: {re.search(r'Pick (.)', t).group(1)}**" if "Pick E" not in t else "Answer: (E)")
    res = run_eval(MCTask(), gen, "m", items, tmp_path, n=1, progress=False)
    assert res["metrics"]["accuracy"] == 0.8 and res["config"]["regex_version"] == "2024-11"   # "(E)" is not extracted

def test_humaneval_task_in_sandbox(tmp_path):
    he = humaneval_items().subset(limit=6)
    by_prompt = {it["prompt"]: it for it in he}
    def reply(t, i, rng):
        it = next(v for k, v in by_prompt.items() if t.endswith(k))
        if it["id"] == "HumanEval/5": return "```python\nimport os\nos._exit(0)\n```"   # hostile: must not pass
        body = it["canonical_solution"] if i < 2 else "    return None\n"
        return f"```python\ndef {it['entry_point']}(*a):\n{body}```"
    res = run_eval(HumanEvalTask(n=4, ks=(1, 2, 4)), FakeGenerator(reply), "m", he, tmp_path, progress=False)
    p1 = (5 * 0.5 + 0) / 6
    assert res["metrics"]["pass@1"] == pytest.approx(p1)
    assert res["metrics"]["pass@4"] == pytest.approx(5 / 6)
    assert res["metrics"]["pass@2"] == pytest.approx(5 / 6 * (1 - 1 / 6))
    assert {s["status"] for s in res["samples"] if s["item_id"] == "HumanEval/5"} == {"failed"}
    assert all(s["isolation"] in ("full", "degraded") for s in res["samples"])

def test_humaneval_records_name_a_degraded_sandbox(tmp_path):
    "Every record and the result say which kernel layers were missing when a program ran."
    he = humaneval_items().subset(limit=2)
    canon = {it["prompt"]: f"```python\ndef {it['entry_point']}(*a):\n{it['canonical_solution']}```" for it in he}
    reply = lambda t, i, rng: next(v for k, v in canon.items() if t.endswith(k))
    res = run_eval(HumanEvalTask(n=1, ks=(1,), sandbox=dict(layers=dict(netns=False))), FakeGenerator(reply), "m", he,
                   tmp_path, progress=False)
    assert res["metrics"]["pass@1"] == 1.0
    assert [(s["isolation"], s["missing"]) for s in res["samples"]] == [("degraded", ["netns"])] * 2
    assert res["details"]["sandbox"] == {"isolation": "degraded", "missing": ["netns"]}
    assert read_jsonl_resume(tmp_path / "m" / "humaneval.samples.jsonl")[0]["missing"] == ["netns"]

def test_rescore_with_another_judge_without_generation(tmp_path):
    from phi4_nb.evals import rescore
    items = arith_items(6)
    gen = FakeGenerator(arith_reply)
    first = run_eval(MathTask(), gen, "m", items, tmp_path / "a", n=3, progress=False)
    calls = gen.calls
    lenient = GeneratorJudge(FakeGenerator(lambda t, i, r: "Yes"), "yes-man", "equality")
    for src in (tmp_path / "a" / "m" / "math.json", tmp_path / "a" / "m" / "math.samples.jsonl", first):
        again = rescore(MathTask(judge=lenient, judge_workers=4), src, items, tmp_path / "b", n_boot=100)
        assert gen.calls == calls and again["metrics"]["accuracy"] == 1.0
        assert [s["completion"] for s in again["samples"]] == [s["completion"] for s in first["samples"]]
        assert again["judge_ids"]["equality"] == lenient.id and "rescored_from" in again["config"]
    same = rescore(MathTask(), first, items, tmp_path / "c", n_boot=1000)
    assert same["metrics"] == first["metrics"] and [s["correct"] for s in same["samples"]] == [s["correct"] for s in first["samples"]]
    with pytest.raises(MixedJudgesError): results_table([first, again])
    with pytest.raises(ValueError): rescore(MathTask(), first, arith_items(8), tmp_path / "d")   # items without completions

def test_threaded_judge_scoring_keeps_order(tmp_path):
    import threading, time as _t
    seen = set()
    def reply(t, i, r):
        seen.add(threading.get_ident()); _t.sleep(0.01)
        return "A" if "Gold answer: City0" in t or "Gold answer: City2" in t else "B"
    judge = GeneratorJudge(FakeGenerator(reply), "slow-grader", "simpleqa")
    items = tinyworld_simpleqa(8)
    res = run_eval(SimpleQATask(judge=judge, judge_workers=4), FakeGenerator(lambda t, i, r: "Something."), "m", items,
                   tmp_path, n=1, progress=False)
    assert [s["grade"] for s in res["samples"]] == ["correct", "incorrect", "correct"] + ["incorrect"] * 5
    assert len(seen) > 1
