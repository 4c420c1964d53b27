"""Decontamination (Appendix B): normalisation, thresholds, short items, allowed 13-grams, loaders and bad input.

Run: pytest tests/test_decontam.py
"""
import json, pickle
import pytest
from phi4_nb.sources import default_data_root as data_root
from phi4_nb.text import words as normalize
from phi4_nb.decontam import (Benchmark, DecontamIndex, check, decontaminate, filter_clean, contamination_report,
                              write_report, read_jsonl, load_gsm8k, load_math, load_humaneval, eval_benchmarks,
                              benchmark_from_items)

WORDS = [f'w{i}' for i in range(40)]

def _bench(*texts, name='b'):
    return Benchmark(name, [{'id': f'{name}/{i}', 'text': t} for i, t in enumerate(texts)])

def _have_data():
    try: data_root(); return True
    except FileNotFoundError: return False

needs_data = pytest.mark.skipif(not _have_data(), reason='benchmark data (../shared/data) not present')


def test_normalize_punctuation_and_case():
    assert normalize("It's 1.8 km -- SO far!\n\n x_y") == ['it', 's', '1', '8', 'km', 'so', 'far', 'x', 'y']
    assert normalize("   \t") == []


def test_thresholds_are_strict_and_inclusive_as_specified():
    item = ' '.join(WORDS[:16])            # 16 distinct words: 10 distinct 7-grams
    ix = DecontamIndex([_bench(item)], info_7gram_threshold=0.2, contaminated_7gram_threshold=0.3)
    filler = ' '.join(f'f{i}' for i in range(20))
    two = ' '.join(WORDS[:8]) + ' ' + filler    # shares exactly 2 7-grams: ratio 0.2, not above info
    three = ' '.join(WORDS[:9]) + ' ' + filler  # shares 3: ratio 0.3 == contaminated threshold
    r2, r3 = check(ix, two), check(ix, three)
    assert r2['status'] == 'clean' and r2['ratio'] == pytest.approx(0.2)
    assert r3['status'] == 'contaminated' and r3['reason'] == '7-gram' and r3['ratio'] == pytest.approx(0.3)
    ix.info, ix.cont = 0.2, 0.5
    r = check(ix, three)
    assert r['status'] == 'partial' and r['items'] == ['b/0']


def test_ratio_uses_min_of_both_counts():
    item = ' '.join(WORDS)                 # 34 7-grams
    ix = DecontamIndex([_bench(item)])
    doc = ' '.join(WORDS[10:22])           # 12 words (no 13-gram), 6 7-grams, all in the item
    r = check(ix, doc)
    assert r['ratio'] == pytest.approx(1.0) and r['status'] == 'contaminated' and r['reason'] == '7-gram'


def test_13gram_match_wins_and_lists_items():
    ix = DecontamIndex([_bench(' '.join(WORDS[:20]), ' '.join(WORDS[5:30]))])
    r = check(ix, 'prefix text ' + ' '.join(WORDS[6:19]) + ' suffix')
    assert r['status'] == 'contaminated' and r['reason'] == '13-gram' and r['items'] == ['b/0', 'b/1']


def test_short_items_and_documents():
    ix = DecontamIndex([_bench('Compute 8 choose 4.', 'Evaluate the sum of the first ten odd numbers please')])  # 4 and 10 words
    assert ix.lens13 == [4, 10, ] and ix.lens7 == [4, 7]
    assert check(ix, 'Exercise: compute 8 choose 4!')['status'] == 'contaminated'
    assert check(ix, 'evaluate the sum of the first ten odd numbers please')['reason'] == '13-gram'
    assert check(ix, 'compute 8 choose')['status'] == 'clean'
    assert check(ix, '')['status'] == 'clean'
    with pytest.raises(ValueError, match='at least one'): DecontamIndex([_bench()])


def test_allowed_13grams_from_reference():
    boiler = 'a i only b ii only c iii only d ii and iii only'
    item = f'which is true about the heron of varo that nests on high cliffs and hatches its eggs after forty days {boiler}'
    ix = DecontamIndex([_bench(item)])
    filler = ' '.join(f'f{j}' for j in range(40))
    ref = [f'question {i} {filler} {boiler}' for i in range(6)]   # boilerplate inside a longer text
    assert check(ix, ref[0])['reason'] == '13-gram'
    assert len(ix.allow_common(ref[:4], min_docs=5)) == 0        # not common enough yet
    assert len(ix.allow_common(ref, min_docs=5)) >= 1
    r = check(ix, ref[0])                                         # the 7-gram rule has no allowed list: partial at most
    assert (r['status'], r['reason']) == ('partial', '7-gram')
    assert check(ix, item)['status'] == 'contaminated'
    with pytest.raises(ValueError, match='min_docs'): ix.allow_common(ref, min_docs=0)


def test_bad_parameters_and_documents(tmp_path):
    b = _bench('x y z')
    with pytest.raises(ValueError, match='threshold'): DecontamIndex([b], info_7gram_threshold=0.7, contaminated_7gram_threshold=0.5)
    with pytest.raises(ValueError, match='twice'): DecontamIndex([b, b])
    ix = DecontamIndex([b])
    with pytest.raises(ValueError, match="'text'"): list(decontaminate([{'body': 'x'}], ix, progress=False))
    with pytest.raises(ValueError, match="'text'"): list(decontaminate([3], ix, progress=False))
    with pytest.raises(ValueError, match="document 20"): list(decontaminate(['fine'] * 20 + [{'x': 1}], ix, progress=False, workers=2))
    with pytest.raises(FileNotFoundError): DecontamIndex.load(tmp_path/'none.pkl')
    (tmp_path/'bad.pkl').write_bytes(pickle.dumps({'not': 'an index'}))
    with pytest.raises(ValueError, match='DecontamIndex'): DecontamIndex.load(tmp_path/'bad.pkl')
    with pytest.raises(ValueError, match='none of the text fields'): benchmark_from_items('tw', [{'id': 1, 'q': 'x'}])


def test_jsonl_errors_and_data_root(tmp_path):
    p = tmp_path/'x.jsonl'
    p.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r'x.jsonl:3: malformed'): read_jsonl(p)
    with pytest.raises(FileNotFoundError): read_jsonl(tmp_path/'missing.jsonl')
    with pytest.raises(FileNotFoundError, match='not found'): data_root(tmp_path/'nope')
    (tmp_path/'gsm8k').mkdir()
    with pytest.raises(FileNotFoundError): load_gsm8k('test', tmp_path)
    (tmp_path/'gsm8k'/'test.jsonl').write_text('{"question": "q?", "answer": "a\\n#### 1"}\n{"question": ')
    with pytest.raises(ValueError, match='test.jsonl'): load_gsm8k('test', tmp_path)


def test_save_load_workers_and_report(tmp_path):
    ix = DecontamIndex([_bench(' '.join(WORDS[:20]), name='a'), _bench('the heron nests on the cliffs of varo every spring', name='c')])
    ix.save(tmp_path/'ix.pkl')
    ix2 = DecontamIndex.load(tmp_path/'ix.pkl')
    docs = [' '.join(WORDS[:14]), 'nothing here', {'id': 'd', 'text': 'the heron nests on the cliffs of varo every spring!'}] * 5
    r1 = [r['status'] for r in decontaminate(docs, ix, progress=False)]
    assert r1 == [r['status'] for r in decontaminate(docs, ix2, progress=False, workers=2)]
    assert r1[:3] == ['contaminated', 'clean', 'contaminated']
    assert len(list(filter_clean(docs, ix))) == 5
    rep = contamination_report(docs, ix, progress=False)
    assert rep['benchmarks']['a']['docs_contaminated_13gram'] == 5 and rep['benchmarks']['c']['items_touched'] == 1
    j, m = write_report(rep, tmp_path/'rep')
    assert json.loads(j.read_text())['n_docs'] == 15 and '| a |' in m.read_text()
    assert sorted(x.name for x in tmp_path.iterdir()) == ['ix.pkl', 'rep.json', 'rep.md']  # no temp files left


def test_humaneval_loader():
    he = load_humaneval()
    assert len(he) == 164 and he.items[0]['id'] == 'HumanEval/0'
    ix = DecontamIndex([he])
    assert check(ix, 'Here is a solution I found online:\n' + he.items[3]['text'])['items'] == ['HumanEval/3']
    assert check(ix, 'def add(a, b):\n    return a + b\n')['status'] == 'clean'


@needs_data
def test_real_benchmarks_copy_caught_generic_clean():
    g, m = load_gsm8k('test'), load_math('test')
    assert (len(g), len(m)) == (1319, 5000)
    assert [b.name for b in eval_benchmarks()] == ['gsm8k', 'math', 'humaneval']
    assert g.items[0]['id'] == 'gsm8k-test-1' and m.items[0]['id'] == 'test/algebra/1'
    assert load_gsm8k('test', with_answers=False).items[0]['text'] == g.items[0]['question']
    ix = DecontamIndex([Benchmark('gsm8k', g.items[:200])])
    q = g.items[17]['text'].split('\n')[0]
    assert check(ix, 'Homework help please! ' + q)['items'] == [g.items[17]['id']]
    assert check(ix, 'The farmer sold some apples at the market and bought a new hat.')['status'] == 'clean'


def test_tinyworld_benchmarks(tmp_path):
    from phi4_nb.world import World, build_world
    from phi4_nb.decontam import tinyworld_benchmarks
    w = World(seed=3)
    bs = tinyworld_benchmarks(w)
    assert all(b.name.startswith('tinyworld-') and len(b) for b in bs)
    code = next(b for b in bs if b.name == 'tinyworld-code').items[0]
    assert code['canonical_solution'] in code['text'] and code['text'].count(code['canonical_solution']) == 1
    ix = DecontamIndex(bs)
    assert check(ix, 'From a forum: ' + code['text'])['status'] == 'contaminated'
    with pytest.raises(FileNotFoundError, match='no TinyWorld test sets'): tinyworld_benchmarks(tmp_path)


def test_7gram_ratio_with_short_items_present():
    "Short items add shorter gram lengths to the probe; the 7-gram overlap of normal items must still count."
    item = ' '.join(WORDS[:16])
    ix = DecontamIndex([_bench(item, 'Compute 8 choose 4.', 'why')], info_7gram_threshold=0.2, contaminated_7gram_threshold=0.3)
    assert ix.lens7 == [1, 4, 7] and len(ix.short7) == 2
    three = ' '.join(WORDS[:9]) + ' ' + ' '.join(f'f{i}' for i in range(20))
    r = check(ix, three)
    assert (r['status'], r['reason'], r['items']) == ('contaminated', '7-gram', ['b/0'])
    assert check(ix, 'and why not compute 8 choose 4')['items'] == ['b/1', 'b/2']


def test_check_batch_equals_check():
    "The batched path (one hash stream, boundary-crossing n-grams dropped) gives exactly check's results."
    import random
    from phi4_nb.decontam import check_batch
    from phi4_nb.text import word_ids
    he = load_humaneval()
    ix = DecontamIndex([Benchmark('he', he.items[:40]), _bench('Compute 8 choose 4.', ' '.join(WORDS[:16]), 'why')],
                       info_7gram_threshold=0.1, contaminated_7gram_threshold=0.4)
    rnd = random.Random(0)
    vocab = normalize(' '.join(it['text'] for it in he.items[:40])) + WORDS
    texts = ['', 'why', 'compute 8 choose 4'] + [it['text'] for it in he.items[30:50]]
    texts += [' '.join(rnd.choice(vocab) for _ in range(rnd.randint(0, 60))) for _ in range(150)]
    texts += [he.items[i]['text'][: rnd.randint(10, 200)] + ' ' + ' '.join(WORDS[:rnd.randint(0, 16)]) for i in range(60)]
    want = [check(ix, t, per_benchmark=True) for t in texts]
    assert check_batch(ix, texts, per_benchmark=True) == want
    assert len({r['status'] for r in want}) == 3                # the sample covers clean, partial and contaminated
    got = [r for r in decontaminate(texts, ix, progress=False, batch_size=7)]
    assert [{k: v for k, v in r.items() if k not in ('id', 'source', 'n_bytes')} for r in got] == want
    # the allowed list counts documents the same way as the one-by-one probe
    ref = texts[:120]
    counts = {}
    for t in ref:
        for h in ix.probe(word_ids(normalize(t)))[0]: counts[h] = counts.get(h, 0) + 1
    assert sorted(h for h, c in counts.items() if c >= 2) == ix.allow_common(ref, min_docs=2).tolist()
