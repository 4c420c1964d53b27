"AMC protocol: problem files, converter, extractor, scoring, runs and 2-sigma bars, judge fallback, plot."
import json, math, re
import numpy as np
import pytest
from phi4_nb.judges import FakeGenerator, GeneratorJudge, RuleJudge
from phi4_nb.evals import Items, load_result
from phi4_nb.amc import (normalize_problem, load_amc, write_amc, assign_tests, mc_to_amc, amc_prompt, extract_amc_answer,
                         points, amc_scores, AMCTask, run_amc, plot_amc, PAPER_AMC, NONE_OF_THESE, SCORING)

def tinyworld_mc(n=50):
    "Items shaped like TinyWorld's mc test set (4 options + 'None of these', answer letter)."
    out = []
    for i in range(n):
        opts = [str(i + 3), str(i + 4), str(i + 5), str(i + 6)]
        letter = "ABCDE"[i % 5]
        if letter == "E": opts[0] = "999"
        else: opts[i % 5] = str(i + 100)
        out.append(dict(id=f"mc-te-{i:05d}", task="mc", question="(rendered with options)", stem=f"What is {i} plus 100?",
                        choices=opts + [NONE_OF_THESE], answer=letter, answer_text=str(i + 100), source="arith", ref=f"arith-{i}"))
    return out

# ---------------------------------------------------------------- files and conversion
def test_problem_file_roundtrip_and_validation(tmp_path):
    probs = mc_to_amc(tinyworld_mc(30), prefix="tw")
    write_amc(tmp_path / "p.jsonl", probs)
    back = load_amc(tmp_path / "p.jsonl")
    assert len(back) == 30 and back[0]["tests"] == ["tw-1"] and back[29]["tests"] == ["tw-2"]
    assert back.info["file_sha256"] and back[0]["choices"]["E"] == NONE_OF_THESE and back[0]["source"] == "arith"
    bad = tmp_path / "bad.jsonl"
    for line, msg in [('{"id": 1, "problem": "x", "choices": ["1","2","3","4","5"]}', "lacks field 'answer'"),
                      ('{"id": 1, "problem": "x", "choices": {"A": 1}, "answer": "A"}', "keys A-E"),
                      ('{"id": 1, "problem": "x", "choices": ["1","2","3","4","5"], "answer": "Z"}', "letter A-E"),
                      ('{"id": 1, "problem": "x", ', "malformed JSON")]:
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=re.escape(msg)): load_amc(bad)
    with pytest.raises(FileNotFoundError): load_amc(tmp_path / "missing.jsonl")
    dup = [normalize_problem(p) for p in probs[:2]]; dup[1]["id"] = dup[0]["id"]
    with pytest.raises(ValueError, match="unique"): assign_tests(dup)

def test_untested_file_groups_by_25_and_shared_tests(tmp_path):
    rows = [dict(id=f"p{i}", problem=f"q{i}", choices=list("12345"), answer="A") for i in range(60)]
    rows[0]["test"] = ["10A", "12A"]
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_amc(tmp_path / "f.jsonl")
    assert items[0]["tests"] == ["10A", "12A"] and items[1]["tests"] == ["test-1"] and items[59]["tests"] == ["test-3"]

def test_converter_answer_forms_and_errors():
    four = [dict(id="a", question="Q?", choices=["x", "y", "z", "w"], answer="z")]
    p = mc_to_amc(four)[0]
    assert p["answer"] == "C" and p["choices"]["E"] == NONE_OF_THESE and p["problem"] == "Q?"
    with pytest.raises(ValueError, match="5 options"): mc_to_amc(four, pad=False)
    with pytest.raises(ValueError, match="neither"): mc_to_amc([dict(id="a", question="Q", choices=list("abcde"), answer="q")])
    dict_choices = [dict(id="b", question="Q", choices={"A": "1", "B": "2", "C": "3", "D": "4", "E": "5"}, answer="E")]
    assert mc_to_amc(dict_choices)[0]["answer"] == "E"

def test_prompt_has_scoring_rule_and_options():
    p = amc_prompt(mc_to_amc(tinyworld_mc(1))[0])
    assert "SCORING: 6 points for each correct answer, 1.5 points for each problem left unanswered, 0 points for each incorrect answer." in p
    assert "\\boxed{blank}" in p and "# Question" in p and "(E) None of these" in p and "one of 25 questions on a multiple-choice math" in p
    assert "one of 20 questions on a multiple-choice general-knowledge test" in amc_prompt(mc_to_amc(tinyworld_mc(1))[0], 20, "general-knowledge")

# ---------------------------------------------------------------- extraction
CH = dict(A="12", B="\\frac{3}{4}", C="\\sqrt{2}", D="7", E="none of these")

@pytest.mark.parametrize("text,want", [
    ("\\boxed{A}", ("A", "boxed")), ("\\boxed{(b)}", ("B", "boxed")), ("$\\boxed{\\textbf{(C)}}$", ("C", "boxed")),
    ("first \\boxed{A} then corrected \\boxed{D}", ("D", "boxed")), ("\\boxed{\\text{blank}}", ("blank", "boxed")),
    ("so it is \\boxed{0.75}", ("B", "boxed-value")), ("\\boxed{\\sqrt{2}}", ("C", "boxed-value")),
    ("\\boxed{13}", ("none", "none")),
    ("The answer is (D).", ("D", "phrase")), ("answer: $\\text{(A)}$", ("A", "phrase")), ("Final answer: **E**", ("E", "phrase")),
    ("The correct option is C", ("C", "phrase")),
    ("lots of work\n\n**(B)**", ("B", "last-line")), ("work\nA.", ("A", "last-line")),
    ("I cannot solve this, so I will leave it blank.", ("blank", "blank-phrase")),
    ("A lengthy argument about Bob and Carol.", ("none", "none")), ("", ("none", "none"))])
def test_extractor(text, want): assert extract_amc_answer(text, CH) == want

def test_points():
    assert [points(l, "C") for l in ("C", "A", "blank", "none")] == [6.0, 0.0, 1.5, 0.0]
    assert points("none", "C", none_as="blank") == 1.5 and SCORING == dict(correct=6.0, blank=1.5, wrong=0.0)

# ---------------------------------------------------------------- statistics
def test_amc_scores_exact():
    s = amc_scores({"a": [6, 0], "b": [1.5, 6], "c": [0, 0]}, {"t1": ["a", "b"], "t2": ["b", "c"]})
    # run 0: t1 = 7.5, t2 = 1.5 -> 4.5 ; run 1: t1 = 6, t2 = 6 -> 6
    assert s["run_scores"] == [4.5, 6.0] and s["score"] == 5.25
    assert s["two_sigma"] == pytest.approx(2 * np.std([4.5, 6.0], ddof=1) / math.sqrt(2))
    assert s["per_test"] == {"t1": 6.75, "t2": 3.75} and s["max_score"] == {"t1": 12.0, "t2": 12.0}
    assert s["expected_score"] == pytest.approx(5.25)

def test_amc_scores_runs_with_replacement_converge():
    rng = np.random.default_rng(0)
    samples = {f"q{i}": rng.choice([0.0, 1.5, 6.0], p=[0.3, 0.2, 0.5], size=10).tolist() for i in range(25)}
    tests = {"t": sorted(samples)}
    a = amc_scores(samples, tests, runs=2000, seed=1)
    assert a == amc_scores(samples, tests, runs=2000, seed=1) and a["runs"] == 2000
    assert abs(a["score"] - a["expected_score"]) < 3 * a["two_sigma"] / 2 + 1e-9
    with pytest.raises(ValueError): amc_scores({"q": []}, {"t": ["q"]})

def test_perfect_and_all_blank_scores_are_150_and_37_5(tmp_path):
    probs = mc_to_amc(tinyworld_mc(25), prefix="t")
    right = {p["problem"]: p["answer"] for p in probs}
    def good(t, i, r): return next(f"\\boxed{{{a}}}" for q, a in right.items() if q in t)
    res = run_amc(FakeGenerator(good), "oracle", probs, tmp_path, n=3, progress=False)
    assert res["metrics"]["score"] == 150.0 and res["metrics"]["score_2sigma"] == 0.0
    res = run_amc(FakeGenerator(lambda t, i, r: "\\boxed{blank}"), "abstainer", probs, tmp_path, n=2, progress=False)
    assert res["metrics"]["score"] == 37.5

def test_run_amc_end_to_end_tinyworld(tmp_path):
    probs = mc_to_amc(tinyworld_mc(50), prefix="tw")
    ans = {p["problem"]: p for p in probs}
    def reply(t, i, rng):
        p = next(v for q, v in ans.items() if q in t)
        u = rng.random()
        if u < 0.6: return f"Computing... the value is {p['choices'][p['answer']]}.\nThe answer is ({p['answer']})."
        if u < 0.8: return "I am not sure, so \\boxed{blank}"
        return "Hmm, \\boxed{" + "ABCDE"[(("ABCDE".index(p["answer"])) + 1) % 5] + "}"
    res = run_amc(FakeGenerator(reply), "fake", probs, tmp_path, n=8, progress=False)
    m, d = res["metrics"], res["details"]["amc"]
    assert d["runs"] == 8 and sorted(d["tests"]) == ["tw-1", "tw-2"] and len(d["tests"]["tw-1"]) == 25
    # E[points per question] = 0.6 * 6 + 0.2 * 1.5 = 3.9 -> about 97.5 per test
    assert abs(m["score"] - 97.5) < 15 and m["score_2sigma"] > 0
    assert m["score"] == pytest.approx(np.mean(d["run_scores"])) and m["expected_score"] == pytest.approx(m["score"])
    assert set(d["extraction_rules"]) <= {"phrase", "boxed"} and res["judge_ids"] == {"mc_extract": "rule:amc-extractor-v1"}
    assert res["config"]["temperature"] == 0.5 and res["config"]["n"] == 8
    assert load_result(tmp_path / "fake" / "amc.json")["metrics"] == m

def test_judge_fallback_only_when_rules_fail(tmp_path):
    probs = mc_to_amc(tinyworld_mc(5), prefix="t")
    seen = []
    judge = GeneratorJudge(FakeGenerator(lambda t, i, r: (seen.append(t), "C")[1]), "extractor", "mc_extract")
    order = {p["problem"]: k for k, p in enumerate(probs)}
    texts = ["\\boxed{A}", "rambling without a letter", "\\boxed{B}", "more rambling", "\\boxed{blank}"]
    gen = FakeGenerator(lambda t, i, r: next(texts[k] for q, k in order.items() if q in t))
    res = run_amc(gen, "m", probs, tmp_path, n=1, judge=judge, progress=False)
    rules = [s["rule"] for s in res["samples"]]
    assert rules == ["boxed", "judge", "boxed", "judge", "boxed"] and len(seen) == 2
    assert [s["extracted"] for s in res["samples"]] == ["A", "C", "B", "C", "blank"]
    assert res["judge_ids"]["mc_extract"].startswith("local:extractor")

def test_plot_keeps_reference_separate():
    import matplotlib; matplotlib.use("Agg")
    fig = plot_amc({"ours": (80.0, 4.0)})
    ax_measured, ax_ref = fig.axes[:2]
    assert [t.get_text() for t in ax_measured.get_xticklabels()] == ["ours"]
    assert [t.get_text() for t in ax_ref.get_xticklabels()] == list(PAPER_AMC)
    assert "reference" in ax_ref.get_title() and PAPER_AMC["phi-4"] == 91.8
    assert len(plot_amc({"ours": (80.0, 4.0)}, reference=None).axes) == 1

def test_real_tinyworld_mc_set(tmp_path):
    world = pytest.importorskip("phi4_nb.world")
    try: mc = world.World(seed=0).test_set("mc")
    except Exception as e: pytest.skip(f"TinyWorld unavailable: {e!r}")
    probs = mc_to_amc(mc, prefix="tw")
    assert all(p["answer"] == m["answer"] and p["choices"]["E"] == m["choices"][4] for p, m in zip(probs, mc))
    key = {p["problem"]: p["answer"] for p in probs}
    gen = FakeGenerator(lambda t, i, r: next(f"\\boxed{{{a}}}" for q, a in key.items() if q in t) if i % 2 else "\\boxed{blank}")
    res = run_amc(gen, "half-right", probs, tmp_path, n=2, subject="general-knowledge", progress=False)
    n = len(probs)
    assert res["config"]["n_questions"] == min(n, 25) and res["metrics"]["expected_score"] == pytest.approx(n * (6 + 1.5) / 2 / max(1, math.ceil(n / 25)), rel=0.2)
