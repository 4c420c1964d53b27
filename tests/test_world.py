"TinyWorld: determinism, train/test disjointness, ground truth, test-set shape, atomic build."
import json, random
import pytest
from phi4_nb.world import (World, build_world, load_test_set, TEST_SETS, ground_truth_label, make_arith, make_code_task,
                           CODE_FAMILIES, RELATIONS, passes, buggy_variant, world_config, _norm)

@pytest.fixture(scope='module')
def w(): return World(seed=0, preset='tiny')

def test_deterministic(w):
    w2 = World(seed=0, preset='tiny')
    assert w.documents() == w2.documents()
    assert w.tests == w2.tests
    w3 = World(seed=1, preset='tiny')
    assert [d['text'] for d in w3.documents()] != [d['text'] for d in w.documents()]

def test_tests_stable_when_docs_change(w):
    "Test sets depend on their own streams, not on the corpus size."
    assert World(seed=0, preset='tiny', n_docs=150).tests == w.tests

def test_disjoint(w):
    d = w.check_disjoint()
    assert not any(d.values()), d
    train_ids = {x['id'] for x in w.documents()} | {p.id for p in w.train['arith']} | {t.id for t in w.train['code']}
    test_ids = {t['id'] for k in TEST_SETS for t in w.tests[k]}
    assert not train_ids & test_ids

def test_disjoint_detects_a_planted_leak(w):
    q = w.tests['arith'][0]['question']
    leaked = w.documents() + [dict(text=f"hey all {q} thanks", kind='forum')]
    assert w.check_disjoint(leaked)['questions_in_docs'] == 1
    body = w.tests['code'][3]['canonical_solution']   # a held-out implementation, pasted into a page
    d = w.check_disjoint(w.documents() + [dict(text="look:\n" + body, kind='code')])
    assert d['items_sharing_13grams'] >= 1 and d['questions_in_docs'] == 0

def test_no_appendix_b_contamination(w):
    "The project's decontamination finds no TinyWorld test item in TinyWorld's training documents."
    dc = pytest.importorskip('phi4_nb.decontam')
    ix = dc.DecontamIndex(dc.tinyworld_benchmarks(w))
    bad = [r for r in dc.decontaminate(w.documents(), ix, progress=False) if r['status'] != 'clean']
    assert not bad, bad[:3]

def test_test_set_fields(w):
    for name in TEST_SETS:
        items = w.test_set(name)
        assert len(items) == w.cfg.n_test
        for t in items:
            assert {'id', 'task', 'question', 'answer'} <= set(t) and isinstance(t['answer'], str) and t['task'] == name
        assert len({t['id'] for t in items}) == len(items)
    for t in w.tests['mc']:
        assert len(t['choices']) == 5 and t['answer'] in 'ABCDE' and t['choices'][4] == 'None of these'
        if t['answer'] != 'E': assert t['choices']['ABCD'.index(t['answer'])] == t['answer_text']
        else: assert t['answer_text'] not in t['choices']
    for t in w.tests['code']: assert passes(t['prompt'] + t['canonical_solution'], t['test'])
    for t in w.tests['json_recall']: assert json.loads(t['context'])[t['key']] == t['answer']
    assert {t['known'] for t in w.tests['simpleqa']} == {True, False}
    for t in w.tests['simpleqa']: assert w.fact_by_id[t['fact_id']].stated == t['known']
    with pytest.raises(ValueError, match='known'): w.test_set('mmlu')

def test_arith_answers_exact():
    r = random.Random(0)
    for i in range(200):
        p = make_arith(r, 'x', n_steps=r.randint(1, 5), max_num=50)
        lines, ans = p.solution()
        assert ans == p.answer >= 0
        for l in lines[1:]:  # every equation in the worked solution is true
            lhs, rhs = l.rsplit('=', 1)[0].split()[-3:], int(l.rsplit('=', 1)[1].strip(' .'))
            a, op, b = int(lhs[0]), lhs[1], int(lhs[2])
            assert {'+': a + b, '-': a - b, '×': a * b, '÷': a // b}[op] == rhs

def test_code_tasks_and_bugs():
    r = random.Random(0)
    for fam in CODE_FAMILIES:
        t = make_code_task(r, 'x', fam)
        assert passes(t.code, t.test), fam
        bad = buggy_variant(t, r)
        if bad is not None: assert not passes(t.prompt + bad, t.test)

def test_ground_truth(w):
    docs = w.documents()
    stated = {f.id for f in w.facts if f.stated}
    written = {}
    for d in docs:
        if d['dup_of'] is None:
            for f in d['facts']: written[f] = written.get(f, 0) + 1
    assert set(written) == stated  # every stated fact written, no unstated fact written
    assert all(written[f.id] == f.mentions for f in w.facts if f.stated)
    text = _norm("\n".join(d['text'] for d in docs))
    for f in w.facts:  # no statement of an unstated fact appears anywhere
        if not f.stated:
            assert not any(_norm(s.format(s=f.subject, v=f.value)) in text for s in RELATIONS[f.relation][0]), f
    noise = [d for d in docs if d['is_noise']]
    assert noise and all(ground_truth_label(d) == 0 for d in noise)
    wrong = [d for d in docs if d['is_correct'] is False]
    assert wrong and all(ground_truth_label(d) == 0 for d in wrong)
    ids = {d['id'] for d in docs}
    assert len(ids) == len(docs) and all(d['dup_of'] in ids for d in docs if d['dup_of'])

def test_wrong_forum_answers_are_wrong(w):
    probs = {p.id: p for p in w.train['arith']}
    for d in w.documents():
        if d['kind'] == 'solution' and d['dup_of'] is None:
            p = probs[d['items'][0]]
            assert (f"So the answer is {p.answer}." in d['text'] or f"The answer is {p.answer}." in d['text']) == d['is_correct']

def test_build_world_atomic_and_cached(tmp_path):
    m = build_world(tmp_path, 'tiny', n_docs=100)
    assert (tmp_path / 'manifest.json').exists() and not list(tmp_path.glob('**/*.tmp'))
    assert m['n_docs'] == sum(1 for _ in open(tmp_path / 'organic.jsonl'))
    assert not any(m['disjoint'].values())
    mtime = (tmp_path / 'organic.jsonl').stat().st_mtime_ns
    assert build_world(tmp_path, 'tiny', n_docs=100) == m and (tmp_path / 'organic.jsonl').stat().st_mtime_ns == mtime
    assert build_world(tmp_path, 'tiny', n_docs=120)['n_docs'] != m['n_docs']  # config change rebuilds
    assert len(load_test_set(tmp_path, 'mc')) == m['tests']['mc']
    from phi4_nb.world import get_test_sets
    assert get_test_sets(tmp_path) == get_test_sets(World(0, 'tiny', n_docs=120))  # JSONL round-trips exactly
    with pytest.raises(ValueError, match='unknown test set'): load_test_set(tmp_path, 'nope')
    with pytest.raises(FileNotFoundError): load_test_set(tmp_path / 'missing', 'mc')

def test_bad_config():
    with pytest.raises(ValueError, match='known presets'): world_config('huge')
    with pytest.raises(ValueError, match='unknown world knobs'): World(0, 'tiny', n_dogs=3)

def test_deterministic_across_processes(tmp_path):
    "Same seed, same bytes, whatever Python's string-hash seed is."
    import os, subprocess, sys
    code = ("import sys; from phi4_nb.world import build_world; "
            "m = build_world(sys.argv[1], 'tiny', n_docs=80); print(m['files']['organic.jsonl'], m['files']['tests/arith.jsonl'])")
    outs = [subprocess.run([sys.executable, '-c', code, str(tmp_path / s)], capture_output=True, text=True, check=True,
                           env={**os.environ, 'PYTHONHASHSEED': s}).stdout for s in ('1', '2')]
    assert outs[0] == outs[1] and len(outs[0].split()) == 2
