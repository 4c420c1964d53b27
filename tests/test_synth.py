"""Synthesis workflows: the TinyWorld teacher and the plurality filter, scored against the world's ground truth and
run over HTTP (phi4_serve serving the teacher, and a served model) through the official client.

Run: pytest tests/test_synth.py
"""
import pytest, torch
from phi4_nb.world import World
from phi4_nb.llm import OpenAIBackend, EngineBackend, Request
from phi4_nb.serve import served
from phi4_nb.synth import WorldTeacher, plurality, plurality_questions, extract_number

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
    assert "only the world's training questions" in t.complete([Request(world.test_arith[0].question)])[0].error


def test_plurality_keeps_right_answers_and_drops_unanimous_ones(world):
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"]]
    truth = {p.id: str(p.answer) for p in world.train["arith"]}
    clean = plurality_questions(WorldTeacher(world), qs, n=6)
    assert {r["status"] for r in clean} == {"too-easy"}                  # an exact teacher always agrees with itself
    rows = plurality_questions(WorldTeacher(world, slip_rate=0.3), qs, n=8)
    kept = [r for r in rows if r["status"] == "kept"]
    assert len(kept) >= 0.3 * len(rows)
    assert sum(r["answer"] == truth[r["id"]] for r in kept) >= 0.95 * len(kept)
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
    assert [r["id"] for r in rows] == [q["id"] for q in qs] and all(r["teacher"] == "tiny" for r in rows)
    assert all(r["status"] in ("kept", "too-easy", "ambiguous") for r in rows)


JOB = '''
import sys, time
from pathlib import Path
from phi4_nb import reproduce as R, synth
root, log = Path(sys.argv[1]), Path(sys.argv[2])
synth.WorldTeacher.chunk = 1                                   # one call at a time, each logged before it is answered
answer = synth.WorldTeacher._complete
def slow(self, reqs):
    with open(log, 'a') as f: f.write(''.join(f"{r.seed}\\n" for r in reqs))
    time.sleep(0.05)
    return answer(self, reqs)
synth.WorldTeacher._complete = slow
R.reproduce('tiny', stages=['world', 'synth'], reports=[], root=root)
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
    while not log.exists() or len(log.read_text().split()) < 12:
        assert p.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    before = log.read_text().split()
    run(tmp_path/"killed", log)                                  # the restart
    data = lambda root: (root/"tiny"/"synth"/"dataset"/"plurality.jsonl").read_text()
    assert data(tmp_path/"killed") == data(tmp_path/"whole")
    whole, calls = (tmp_path/"whole.log").read_text().split(), log.read_text().split()
    assert sorted(set(calls)) == sorted(whole) and len(whole) == 40
    assert 12 <= len(before) < 40 and len(calls) - len(whole) <= 1   # at most the call in flight at the kill again


def test_datatrove_with_two_tasks_gives_the_one_process_dataset(world, tmp_path):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from phi4_nb.core import write_jsonl, read_jsonl
    from phi4_nb.synth import PluralityStep
    for k in range(4):
        write_jsonl(tmp_path/"seeds"/f"{k}.jsonl", [dict(id=p.id, text=p.question) for p in world.train["arith"][k::4][:8]])
    def go(tasks):
        LocalPipelineExecutor([JsonlReader(str(tmp_path/"seeds")), PluralityStep(WorldTeacher(world, 0.3), n=8),
                               JsonlWriter(str(tmp_path/f"out{tasks}"), output_filename="${rank}.jsonl", compression=None)],
                              tasks=tasks, workers=tasks, logging_dir=str(tmp_path/f"logs{tasks}")).run()
        rows = [r for f in sorted((tmp_path/f"out{tasks}").glob("*.jsonl")) for r in read_jsonl(f)]
        return sorted((r["id"], r["metadata"]["status"], r["metadata"]["answer"], r["metadata"]["seed"]) for r in rows)
    one, two = go(1), go(2)
    assert one == two and len(one) == 32 and len(list((tmp_path/"out2").glob("*.jsonl"))) == 2
    qs = [dict(id=p.id, question=p.question) for p in world.train["arith"]]
    direct = {r["id"]: (r["status"], r["answer"]) for r in plurality_questions(WorldTeacher(world, 0.3), qs, n=8)}
    assert all(direct[i] == (s, a) for i, s, a, _ in one)         # sharding changes nothing: seeds follow the item
