"""Synthesis workflows: the TinyWorld teacher and every workflow's filter, scored against the world's ground truth,
run over HTTP (phi4_serve serving the teacher, and a served model) through the official client, on datatrove, and
killed and restarted.

Run: pytest tests/test_synth.py
"""
import pytest, torch
from phi4_nb.world import World
from phi4_nb.llm import OpenAIBackend, EngineBackend, Request
from phi4_nb.serve import served
from phi4_nb.synth import WorldTeacher, WorldKnowledge, plurality, plurality_questions, extract_number
from phi4_nb import synth as S
from phi4_nb.llm import Backend, Reply

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def world(): return World(0, "tiny")


@pytest.mark.parametrize("answers,status,answer", [
    (["3"] * 6, "too-easy", "3"), (["3"] * 4 + ["4"] * 2, "kept", "3"), (["3"] * 3 + ["4"] * 3, "ambiguous", None),
    (["3", "4", "5", "6"], "ambiguous", None), ([None] * 4, "ambiguous", None), (["3"] * 3 + [None] * 3, "ambiguous", None),
    (["3"] * 4 + [None] * 2, "kept", "3")])
def test_plurality_rule(answers, status, answer):
    v = plurality(answers)
    assert (v["status"], v["answer"]) == (status, answer)


def test_exact_teacher_knows_every_training_question(world):
    t = WorldTeacher(world)
    qs = world.train["arith"]
    got = t.generate([p.question for p in qs], temperature=0)
    assert [extract_number(g[0]) for g in got] == [str(p.answer) for p in qs]
    code = t.generate([c.prompt for c in world.train["code"][:5]], temperature=0)
    assert [g[0] for g in code] == [c.canonical_solution for c in world.train["code"][:5]]
    assert "cannot answer this question" in t.complete([Request(world.test_arith[0].question)])[0].error


def test_plurality_keeps_right_answers_and_drops_unanimous_ones(world):
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"]]
    truth = {p.id: str(p.answer) for p in world.train["arith"]}
    clean = plurality_questions(WorldTeacher(world), qs, n=6)
    assert {r["status"] for r in clean} == {"too-easy"}                  # an exact teacher always agrees with itself
    rows = plurality_questions(WorldTeacher(world, slip_rate=0.3), qs, n=8)
    kept = [r for r in rows if r["status"] == "kept"]
    assert len(kept) >= 0.3 * len(rows)
    assert sum(r["answer"] == truth[r["seed_id"]] for r in kept) >= 0.95 * len(kept)
    assert all(extract_number(r["solution"]) == r["answer"] for r in kept)   # the kept text agrees with the plurality
    assert all(r["workflow"] == "plurality" and r["prompt_version"] and r["seed"] is not None for r in rows)


def test_the_workflow_over_http_equals_the_direct_run(world):
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"][:20]]
    teacher = WorldTeacher(world, slip_rate=0.3)
    direct = plurality_questions(teacher, qs, n=8)
    with served(teacher) as url:
        remote = plurality_questions(OpenAIBackend(teacher.model_id, url, concurrency=8), qs, n=8)
    assert remote == direct


def test_a_served_model_runs_the_workflow(world):
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    from phi4_nb.tokenizer import train_bpe, stdlib_texts
    tok = train_bpe(stdlib_texts(), vocab_size=1024)
    torch.manual_seed(0)
    eb = EngineBackend(Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))), tok, model_id="tiny")
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"][:6]]
    with served(eb) as url:
        rows = plurality_questions(OpenAIBackend("tiny", url), qs, n=4, max_tokens=16)
    assert [r["seed_id"] for r in rows] == [q["id"] for q in qs] and all(r["teacher"] == "tiny" for r in rows)
    assert all(r["status"] in ("kept", "too-easy", "ambiguous") for r in rows)


def _seeds(world):
    docs = [d for d in world.documents() if not d["dup_of"]][:200]
    tags = S.tag_seeds(WorldTeacher(world), docs)
    return docs, {r["seed_id"]: (r["status"], r["tags"]["information_type"]) for r in tags if r["tags"]}


K = dict(tag=12, plurality=4, n=4, qa=4, rewrite=3, revise=4, agents=3, reversal=3, web_rewrite=4, fim=4)
SETTINGS = dict(temperature=0.8, rounds=2, turns=2)


def test_every_workflow_over_http_equals_the_direct_run(world):
    from phi4_nb.reproduce import _workflows
    docs, tagged = _seeds(world)
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"][:8]]
    teacher, know = WorldTeacher(world, slip_rate=0.4), WorldKnowledge(world)
    direct = _workflows(S, teacher, know, docs, qs, K, SETTINGS, 0, tagged)
    with served(teacher) as url:
        remote = _workflows(S, OpenAIBackend(teacher.model_id, url, concurrency=8), know, docs, qs, K, SETTINGS, 0, tagged)
    assert remote == direct and set(direct) == {"tag", "plurality", "qa", "rewrite", "revise", "agents", "reversal",
                                                "web_rewrite", "fim"}
    for name, rows in direct.items():
        assert rows and sum(r["status"] == "kept" for r in rows) >= len(rows) // 2, name
        assert all(r["workflow"] == name and r["teacher"] == teacher.model_id and "@v1" in r["prompt_version"]
                   for r in rows)
        assert all(bool(r["text"]) == (r["status"] == "kept") for r in rows if name != "tag")
    import datasets, tempfile
    out = S.write_dataset(tempfile.mkdtemp(), direct, "t", "d")           # every configuration loads with `datasets`
    for name, rows in direct.items():
        ds = datasets.load_dataset(str(out), name, split="train", cache_dir=tempfile.mkdtemp())
        assert ds.num_rows == len(rows) and ds[0]["id"] == rows[0]["id"]


def test_a_served_model_runs_every_workflow(world):
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    from phi4_nb.tokenizer import train_bpe, stdlib_texts
    from phi4_nb.reproduce import _workflows
    tok = train_bpe(stdlib_texts(), vocab_size=1024)
    torch.manual_seed(0)
    eb = EngineBackend(Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))), tok, model_id="tiny")
    docs, tagged = _seeds(world)
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"][:2]]
    k = {x: 2 for x in K}
    with served(eb) as url:
        out = _workflows(S, OpenAIBackend("tiny", url), WorldKnowledge(world), docs, qs, k, SETTINGS, 0, tagged,
                         max_tokens=12)
    for name, rows in out.items():                      # a random model's output is dropped, never kept by mistake
        assert rows and all(r["teacher"] == "tiny" for r in rows), name
        assert all(r["status"] != "kept" for r in rows if name not in ("plurality",)), (name, rows)


class Scripted(Backend):
    "Answers every request with the next of `texts` (control flow only)."
    model_id = "scripted"
    def __init__(self, texts): super().__init__(None); self.texts = list(texts)
    def _complete(self, reqs): return [Reply([self.texts.pop(0)] * r.n, ["stop"] * r.n) for r in reqs]


def test_critique_finds_the_slip_and_revision_fixes_it(world):
    p = next(p for p in world.train["arith"] if len(p.steps) > 2)
    lines, v = p.solution(slip_at=1, slip=2)
    crit = S.parse_json(WorldTeacher(world).generate([S.CRITIQUE_PROMPT[0].format(question=p.question, solution=" ".join(lines) + f"\nAnswer: {v}")], temperature=0)[0][0])
    assert crit["reasoning"] < 5 and crit["accuracy"] == 1 and len(crit["issues"]) == 1
    good = S.parse_json(WorldTeacher(world).generate([S.CRITIQUE_PROMPT[0].format(question=p.question, solution=WorldTeacher(world).answer("arith", p, None))], temperature=0)[0][0])
    assert good == dict(reasoning=5, accuracy=5, issues=[])
    rows = S.self_revise(WorldTeacher(world, slip_rate=1.0), [dict(id=p.id, question=p.question)], WorldKnowledge(world))
    assert rows[0]["draft_right"] is False and rows[0]["final_right"] is True and rows[0]["n_revisions"] == 1
    assert [x["round"] for x in rows[0]["revisions"]] == [0, 1]        # every version kept


def test_reversal_runs_regenerated_code_in_the_sandbox(world):
    t = world.train["code"][0]
    doc = dict(id="c0", text=f"{t.prompt}{t.canonical_solution}\n{t.test}")
    ok = S.reverse_code(WorldTeacher(world), [doc])[0]
    assert ok["status"] == "kept" and ok["passed"] is True and ok["similarity"] > 0.9
    wrong = t.prompt + t.canonical_solution.replace("return", "return None and", 1)
    hostile = t.prompt + "    import os; os.system('rm -rf ~'); open('/etc/passwd', 'a').write('x')\n" + t.canonical_solution
    for code, why in ((wrong, "tests-failed"), (hostile, "tests-failed")):
        r = S.reverse_code(Scripted([t.prompt, code]), [doc], min_similarity=0.3)[0]
        assert r["status"] == why and r["passed"] is False, r
    far = S.reverse_code(Scripted([t.prompt, "def f():\n    pass\n"]), [doc])[0]
    assert far["status"] == "dissimilar"
    untested = dict(id="c1", text=f"{t.prompt}{t.canonical_solution}")              # no tests: it must still run clean
    crash = S.reverse_code(Scripted([t.prompt, t.code + f"\nprint({t.entry_point}(1, 2, 3, 4))\n"]), [untested])[0]
    assert crash["status"] == "crashed" and crash["tests"] == 0


def test_fim_accepts_an_equivalent_fill_by_running_it(world):
    t = world.train["code"][0]
    doc = dict(id="c0", text=f"{t.prompt}{t.canonical_solution}\n{t.test}")
    it = S.fim_split(doc)
    assert it["prefix"] + it["middle"] + it["suffix"] == doc["text"]
    exact = S.fill_in_middle(Scripted([it["middle"]]), [doc])[0]
    assert exact["status"] == "kept" and exact["exact"] and exact["passed"] is None
    bad = S.fill_in_middle(Scripted(["    return 12345"]), [doc])[0]
    assert bad["status"] == "wrong" and bad["passed"] is False


def test_rewrites_that_lose_or_falsify_facts_are_dropped(world):
    know = WorldKnowledge(world)
    page = next(d for d in world.documents() if d["kind"] == "knowledge" and len(d["facts"]) >= 2)
    fs = know.facts_in(page["text"])
    good = "\n".join(f"Q: {S._question(f)}\nA: {f.value}" for f in fs)
    lost = "\n".join(f"Q: {S._question(f)}\nA: {f.value}" for f in fs[:-1])
    false = good.replace(f"A: {fs[0].value}", "A: 999999")
    rows = S.rewrite(Scripted([good, lost, false]), [page] * 3, know, forms=("exercise",))
    assert [r["status"] for r in rows] == ["kept", "lost-facts", "lost-facts"]
    c = S.check_rewrite(know, "exercise", page["text"], false + f"\nA: {fs[0].value}")
    assert c["coverage"] == 1 and c["claims_right"] < c["claims"]
    copy = S.rewrite(Scripted([page["text"]]), [page], know, forms=("discussion",))[0]     # a copy is not a rewrite
    assert copy["status"] == "copied" and copy["copied"] == 1.0
    web = S.web_rewrite(Scripted([page["text"]]), [page], know)[0]
    assert web["status"] == "copied"


def test_corpus_feeds_the_mixture_pools(world, tmp_path):
    docs, tagged = _seeds(world)
    t, know = WorldTeacher(world), WorldKnowledge(world)
    qa = S.extract_qa(t, [d for d in docs if tagged.get(d["id"], ("", ""))[1] == "reasoning"][:5], know)
    web = S.web_rewrite(t, [d for d in docs if tagged.get(d["id"], ("", ""))[0] == "no-chain"][:5], know)
    out = S.write_dataset(tmp_path/"ds", dict(qa=qa, web_rewrite=web), "t", "d")
    syn, wr = list(S.corpus_docs(out, "synthetic")), list(S.corpus_docs(out, "web_rewrites"))
    assert {d["workflow"] for d in syn} == {"qa"} and {d["workflow"] for d in wr} == {"web_rewrite"}
    assert len(syn) == sum(r["status"] == "kept" for r in qa) > 0 and len(wr) > 0
    with pytest.raises(ValueError, match="pool"): list(S.corpus_docs(out, "books"))
    with pytest.raises(FileNotFoundError): list(S.corpus_docs(tmp_path/"empty", "synthetic"))


JOB = '''
import sys, time
from pathlib import Path
from phi4_nb import reproduce as R, synth
root, log = Path(sys.argv[1]), Path(sys.argv[2])
synth.WorldTeacher.chunk = 1                                   # one call at a time, each logged before it is answered
answer = synth.WorldTeacher._complete
def slow(self, reqs):
    with open(log, 'a') as f: f.write(''.join(f"{r.key(self.model_id)}\\n" for r in reqs))
    time.sleep(0.01)
    return answer(self, reqs)
synth.WorldTeacher._complete = slow
R.STAGE_SETTINGS['tiny']['synth'].update(seeds=60, questions=10,
                                        per_workflow=dict(qa=4, rewrite=2, revise=4, agents=2, reversal=2,
                                                          web_rewrite=3, fim=3))
R.reproduce('tiny', stages=['world', 'tokenizer', 'curate', 'synth'], reports=[], root=root)
'''


def test_a_killed_synthesis_job_restarts_to_the_same_dataset_without_repeating_calls(tmp_path):
    import json, signal, subprocess, sys, time
    script = tmp_path/"job.py"; script.write_text(JOB)
    run = lambda root, log: subprocess.run([sys.executable, str(script), str(root), str(log)], check=True,
                                           capture_output=True, text=True)
    run(tmp_path/"whole", tmp_path/"whole.log")                   # the uninterrupted run
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path/"killed"), str(tmp_path/"killed.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path/"killed.log"
    while not log.exists() or len(log.read_text().split()) < 40:
        assert p.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    before = log.read_text().split()
    run(tmp_path/"killed", log)                                  # the restart
    data = lambda root: {f.name: f.read_text() for f in sorted((root/"tiny"/"synth"/"dataset").glob("*"))}
    assert data(tmp_path/"killed") == data(tmp_path/"whole") and len(data(tmp_path/"whole")) == 10
    whole, calls = (tmp_path/"whole.log").read_text().split(), log.read_text().split()
    assert sorted(set(calls)) == sorted(whole) and len(set(whole)) == len(whole) > 100
    assert 12 <= len(before) < len(whole) and len(calls) - len(whole) <= 1   # at most the call in flight again


def test_datatrove_with_two_tasks_gives_the_one_process_dataset(world, tmp_path):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from phi4_nb.core import write_jsonl, read_jsonl
    from phi4_nb.synth import WorkflowStep
    for k in range(4):
        write_jsonl(tmp_path/"seeds"/f"{k}.jsonl", [dict(id=p.id, text=p.question) for p in world.train["arith"][k::4][:8]])
    def go(tasks):
        LocalPipelineExecutor([JsonlReader(str(tmp_path/"seeds")), WorkflowStep(plurality_questions, WorldTeacher(world, 0.3), n=8),
                               JsonlWriter(str(tmp_path/f"out{tasks}"), output_filename="${rank}.jsonl", compression=None)],
                              tasks=tasks, workers=tasks, logging_dir=str(tmp_path/f"logs{tasks}")).run()
        rows = [r for f in sorted((tmp_path/f"out{tasks}").glob("*.jsonl")) for r in read_jsonl(f)]
        return sorted((r["id"], m["status"], m["answer"], m["seed"]) for r in rows for m in r["metadata"]["synth"])
    one, two = go(1), go(2)
    assert one == two and len(one) == 32 and len(list((tmp_path/"out2").glob("*.jsonl"))) == 2
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"]]
    direct = {r["seed_id"]: (r["status"], r["answer"]) for r in plurality_questions(WorldTeacher(world, 0.3), qs, n=8)}
    assert all(direct[i] == (s, a) for i, s, a, _ in one)         # sharding changes nothing: seeds follow the item
