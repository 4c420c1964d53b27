"""Decontamination (Appendix B): normalisation, thresholds, short items, allowed 13-grams, loaders and bad input.

Run: pytest tests/test_decontam.py
"""
import json, pickle, unicodedata
import numpy as np
import pytest
from phi4_nb.core import data_root
from phi4_nb.text import words as normalize
from phi4_nb.decontam import (Benchmark, DecontamIndex, decontaminate, filter_clean, contamination_report,
                              write_report, report_markdown, read_jsonl, gsm8k_benchmark, math_benchmark, humaneval_benchmark, eval_benchmarks,
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
    r2, r3 = ix.check(two), ix.check(three)
    assert r2['status'] == 'clean' and r2['ratio'] == pytest.approx(0.2)
    assert r3['status'] == 'contaminated' and r3['reason'] == '7-gram' and r3['ratio'] == pytest.approx(0.3)
    ix.info, ix.cont = 0.2, 0.5
    r = ix.check(three)
    assert r['status'] == 'partial' and r['items'] == ['b/0']


def test_ratio_uses_min_of_both_counts():
    item = ' '.join(WORDS)                 # 34 7-grams
    ix = DecontamIndex([_bench(item)])
    doc = ' '.join(WORDS[10:22])           # 12 words (no 13-gram), 6 7-grams, all in the item
    r = ix.check(doc)
    assert r['ratio'] == pytest.approx(1.0) and r['status'] == 'contaminated' and r['reason'] == '7-gram'


def test_13gram_match_wins_and_lists_items():
    ix = DecontamIndex([_bench(' '.join(WORDS[:20]), ' '.join(WORDS[5:30]))])
    r = ix.check('prefix text ' + ' '.join(WORDS[6:19]) + ' suffix')
    assert r['status'] == 'contaminated' and r['reason'] == '13-gram' and r['items'] == ['b/0', 'b/1']


def test_short_items_and_documents():
    ix = DecontamIndex([_bench('Compute 8 choose 4.', 'Evaluate the sum of the first ten odd numbers please')])  # 4 and 10 words
    assert ix.lens_whole == [4] and ix.n7.tolist() == [0, 4] and ix.unindexed == []
    assert ix.check('Exercise: compute 8 choose 4!')['status'] == 'contaminated'
    assert ix.check('compute 8 choose')['status'] == 'clean'
    assert ix.check('')['status'] == 'clean'
    with pytest.raises(ValueError, match='at least one'): DecontamIndex([_bench()])
    with pytest.raises(ValueError, match='min_words'): DecontamIndex([_bench('x y z')], min_words=0)


def test_items_of_7_to_12_words_are_7gram_matches():
    "An item with no 13-gram is judged by the 7-gram rule, and its verbatim copy says so (not '13-gram')."
    for n in (7, 9, 12):
        item = ' '.join(WORDS[:n])
        ix = DecontamIndex([_bench(item)])
        r = ix.check('copied: ' + item + ' end of copy')
        assert (r['status'], r['reason'], r['items'], r['ratio']) == ('contaminated', '7-gram', ['b/0'], 1.0), n
        assert len(ix.h13) == 0 and ix.lens_whole == []
    ten = 'Evaluate the sum of the first ten odd numbers please'
    ix = DecontamIndex([_bench(ten, ' '.join(WORDS[:20]))])
    assert ix.check(ten)['reason'] == '7-gram'
    assert ix.check('so: ' + ' '.join(WORDS[:14]))['reason'] == '13-gram'     # a long item still matches by 13-grams
    rep = contamination_report([ten, ' '.join(WORDS[:14])], ix, progress=False)['benchmarks']['b']
    assert (rep['docs_contaminated_7gram'], rep['docs_contaminated_13gram']) == (1, 1)


def test_short_items_rule():
    "Under min_words (3) an item is not indexed; 3-6 words match whole unless common in the reference corpus."
    ix = DecontamIndex([_bench('why', 'What is 2 + 2?', 'Where do Varo herons nest?')])
    assert ix.check('Why? Nobody knows why the sky is blue.')['status'] == 'clean'     # "why" flags nothing
    assert ix.unindexed == ['b/0'] and ix.lens_whole == [4, 5]
    assert ix.check('Quick one: what is 2 + 2? Four.')['reason'] == 'whole-item'
    r = ix.check('Field notes. Where do Varo herons nest? On the cliffs.')
    assert (r['status'], r['reason'], r['items']) == ('contaminated', 'whole-item', ['b/2'])
    assert ix.check('where do varo herons')['status'] == 'clean'                 # part of a short item is not the item
    reference = [f'Lesson {i}: what is 2 + 2? Count on your fingers.' for i in range(6)]
    ix.allow_common(reference, min_docs=5)
    assert ix.generic == ['b/1']
    assert ix.check('Quick one: what is 2 + 2? Four.')['status'] == 'clean'      # generic: common in the reference
    assert ix.check('Field notes. Where do Varo herons nest?')['status'] == 'contaminated'  # distinctive: still caught
    rep = contamination_report(['what is 2 + 2', 'where do varo herons nest', 'why'], ix, progress=False)
    b = rep['benchmarks']['b']
    assert (b['items_unindexed'], b['items_generic'], b['docs_contaminated_whole'], b['docs_flagged']) == (1, 1, 1, 1)
    assert (rep['n_unindexed_items'], rep['n_generic_items']) == (1, 1)
    assert '| docs_contaminated_whole |' in report_markdown(rep)


def test_allowed_13grams_from_reference():
    boiler = 'a i only b ii only c iii only d ii and iii only'          # 14 words: two 13-grams
    items = [f'which is true about the heron of {p} that nests on high cliffs and hatches its eggs after forty days {boiler}'
             for p in ('varo', 'tell')]
    ix = DecontamIndex([_bench(*items)])
    filler = ' '.join(f'f{j}' for j in range(40))
    ref = [f'question {i} {filler} {boiler}' for i in range(6)]   # boilerplate inside a longer text
    assert ix.check(ref[0])['reason'] == '13-gram'
    assert len(ix.allow_common(ref[:4], min_docs=5)) == 0        # not common enough yet
    assert len(ix.allow_common(ref, min_docs=5)) == 2
    r = ix.check(ref[0])                                         # the 7-gram rule has no allowed list: partial at most
    assert (r['status'], r['reason']) == ('partial', '7-gram')
    assert ix.check(items[0])['status'] == 'contaminated'
    with pytest.raises(ValueError, match='min_docs'): ix.allow_common(ref, min_docs=0)
    with pytest.raises(ValueError, match='min_items'): ix.allow_common(ref, min_items=1)
    with pytest.raises(ValueError, match='independent'): ix.allow_common(ref, train=ref)


def test_allowed_needs_reference_train_and_several_items():
    "Allowed = in >= min_docs reference docs AND (when train is given) in the training set AND in >= min_items items."
    boiler = 'a i only b ii only c iii only d ii and iii only'
    items = [f'statement {k} about the heron of varo and its nest on the high cliffs {boiler}' for k in ('one', 'two', 'three')]
    filler = ' '.join(f'f{j}' for j in range(40))
    ref = [f'quiz {i} {filler} {boiler}' for i in range(6)]
    train_with, train_without = ['the options were ' + boiler, 'nothing here'], ['nothing here', 'nor here']
    assert len(DecontamIndex([_bench(*items)]).allow_common(ref, train=train_with)) == 2
    assert len(DecontamIndex([_bench(*items)]).allow_common(ref, train=train_without)) == 0  # not in the training set
    assert len(DecontamIndex([_bench(*items)]).allow_common(ref, min_items=4)) == 0           # shared by 3 items only
    assert len(DecontamIndex([_bench(items[0])]).allow_common(ref)) == 0                      # one item: never boilerplate
    ix = DecontamIndex([_bench(*items)])
    ix.allow_common(iter(ref), train=iter(train_with))                   # iterators are read once
    assert len(ix.allowed) == 2 and ix.check(items[1])['status'] == 'contaminated'


def _leak(item, n_copies=6, quote_words=14):
    "Training docs with `item` copied whole into `n_copies` posts, and a long post quoting its first words."
    filler = ' '.join(f'filler{j}' for j in range(80))
    quote = filler + ' ' + ' '.join(item.split()[:quote_words]) + ' ' + filler
    return [f'Post {i}: my homework tonight. {item} Any ideas?' for i in range(n_copies)], quote


def test_leaked_item_never_allows_itself():
    "A test item leaked into many training docs must not whitelist its own 13-grams: a partial copy stays caught."
    item = ' '.join(WORDS + [f'v{i}' for i in range(20)])    # 60 words: the 14-word quote shares 8 of its 54 7-grams
    leaky, quote = _leak(item)
    ix = DecontamIndex([_bench(item, 'an unrelated second item about herons and cliffs and eggs and the long winter')])
    assert ix.check(quote)['status'] == 'contaminated'
    ix.allow_common(leaky + [quote], min_docs=5)         # even given the leaky corpus itself as the reference
    assert len(ix.allowed) == 0
    r = ix.check(quote)
    assert (r['status'], r['reason'], r['items']) == ('contaminated', '13-gram', ['b/0'])
    assert r['ratio'] <= ix.info                          # the 7-gram rule alone would have let the quote through
    assert [x['status'] for x in decontaminate(leaky + [quote], ix, progress=False)] == ['contaminated'] * 7


@needs_data
def test_decontam_benchmark_catches_a_leaked_gsm8k_item():
    "The benchmark run learns its allowed list from an independent reference, not from the docs it checks."
    from phi4_nb.decontam import decontam_benchmark
    g = gsm8k_benchmark('test')
    item = g.items[5]['text']
    leaky, quote = _leak(item, quote_words=16)
    rep = decontam_benchmark(docs=[{'id': f'leak{i}', 'text': t} for i, t in enumerate(leaky)] + [{'id': 'quote', 'text': quote}],
                             progress=False)
    s = rep['benchmarks']['gsm8k']
    assert (s['docs_contaminated_13gram'], s['items_touched'], s['docs_flagged']) == (7, 1, 7)
    assert rep['n_allowed_13grams'] == 0 and rep['reference'].startswith('reference_corpus')


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
    with pytest.raises(FileNotFoundError): gsm8k_benchmark('test', tmp_path)
    (tmp_path/'gsm8k'/'test.jsonl').write_text('{"question": "q?", "answer": "a\\n#### 1"}\n{"question": ')
    with pytest.raises(ValueError, match='test.jsonl'): gsm8k_benchmark('test', tmp_path)


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
    he = humaneval_benchmark()
    assert len(he) == 164 and he.items[0]['id'] == 'HumanEval/0'
    ix = DecontamIndex([he])
    assert ix.check('Here is a solution I found online:\n' + he.items[3]['text'])['items'] == ['HumanEval/3']
    assert ix.check('def add(a, b):\n    return a + b\n')['status'] == 'clean'


@needs_data
def test_real_benchmarks_copy_caught_generic_clean():
    g, m = gsm8k_benchmark('test'), math_benchmark('test')
    assert (len(g), len(m)) == (1319, 5000)
    assert [b.name for b in eval_benchmarks()] == ['gsm8k', 'math', 'humaneval']
    assert g.items[0]['id'] == 'gsm8k-test-0000' and m.items[0]['id'] == 'test/algebra/1'
    assert gsm8k_benchmark('test', with_answers=False).items[0]['text'] == g.items[0]['question']
    ix = DecontamIndex([Benchmark('gsm8k', g.items[:200])])
    q = g.items[17]['text'].split('\n')[0]
    assert ix.check('Homework help please! ' + q)['items'] == [g.items[17]['id']]
    assert ix.check('The farmer sold some apples at the market and bought a new hat.')['status'] == 'clean'


def test_tinyworld_benchmarks(tmp_path):
    from phi4_nb.world import World, build_world
    from phi4_nb.decontam import tinyworld_benchmarks
    w = World(seed=3)
    bs = tinyworld_benchmarks(w)
    assert all(b.name.startswith('tinyworld-') and len(b) for b in bs)
    code = next(b for b in bs if b.name == 'tinyworld-code').items[0]
    assert code['canonical_solution'] in code['text'] and code['text'].count(code['canonical_solution']) == 1
    ix = DecontamIndex(bs)
    assert ix.check('From a forum: ' + code['text'])['status'] == 'contaminated'
    with pytest.raises(FileNotFoundError, match='no TinyWorld test sets'): tinyworld_benchmarks(tmp_path)


def test_7gram_ratio_with_short_items_present():
    "Short items add shorter gram lengths to the probe; the 7-gram overlap of normal items must still count."
    item = ' '.join(WORDS[:16])
    ix = DecontamIndex([_bench(item, 'Compute 8 choose 4.', 'why')], info_7gram_threshold=0.2, contaminated_7gram_threshold=0.3)
    assert ix.lens_whole == [4] and len(ix.hw) == 1 and ix.unindexed == ['b/2']
    three = ' '.join(WORDS[:9]) + ' ' + ' '.join(f'f{i}' for i in range(20))
    r = ix.check(three)
    assert (r['status'], r['reason'], r['items']) == ('contaminated', '7-gram', ['b/0'])
    assert ix.check('and why not compute 8 choose 4')['items'] == ['b/1']


def test_check_batch_equals_check():
    "The batched path (one hash stream, boundary-crossing n-grams dropped) gives exactly check's results."
    import random
    from phi4_nb.decontam import check_batch
    from phi4_nb.text import word_ids
    he = humaneval_benchmark()
    ix = DecontamIndex([Benchmark('he', he.items[:40]), _bench('Compute 8 choose 4.', ' '.join(WORDS[:16]), 'why')],
                       info_7gram_threshold=0.1, contaminated_7gram_threshold=0.4)
    rnd = random.Random(0)
    vocab = normalize(' '.join(it['text'] for it in he.items[:40])) + WORDS
    texts = ['', 'why', 'compute 8 choose 4'] + [it['text'] for it in he.items[30:50]]
    texts += [' '.join(rnd.choice(vocab) for _ in range(rnd.randint(0, 60))) for _ in range(150)]
    texts += [he.items[i]['text'][: rnd.randint(10, 200)] + ' ' + ' '.join(WORDS[:rnd.randint(0, 16)]) for i in range(60)]
    want = [ix.check(t, per_benchmark=True) for t in texts]
    assert check_batch(ix, texts, per_benchmark=True) == want
    assert len({r['status'] for r in want}) == 3                # the sample covers clean, partial and contaminated
    got = [r for r in decontaminate(texts, ix, progress=False, batch_size=7)]
    assert [{k: v for k, v in r.items() if k not in ('id', 'source', 'n_bytes')} for r in got] == want
    # the allowed list counts documents the same way as the one-by-one probe, and keeps only shared 13-grams
    ref = texts[:120] + [he.items[3]['text']] * 2             # one item's own 13-grams made common: never allowed
    counts, (h, c) = {}, np.unique(ix.h13, return_counts=True)
    shared = set(h[c >= 2].tolist())
    for t in ref:
        for x in ix.probe(word_ids(normalize(t)))[0]: counts[x] = counts.get(x, 0) + 1
    want = sorted(x for x, k in counts.items() if k >= 2 and x in shared)
    assert want and len(want) < len([x for x, k in counts.items() if k >= 2])   # the sample exercises both conditions
    assert want == ix.allow_common(ref, min_docs=2).tolist()


GSM_LIKE = ("Zoë runs a café that sells 12 crêpes a day for $3 each. On Sundays she sells twice as many crêpes. "
            "How much money does Zoë's café make from crêpes in a week?")
DISGUISES = {
    'decomposed accents': lambda t: unicodedata.normalize('NFD', t),
    'fullwidth letters': lambda t: ''.join(chr(ord(c) + 0xFEE0) if '!' <= c <= '~' else c for c in t),
    'soft hyphens': lambda t: ' '.join(w[:2] + '\u00ad' + w[2:] for w in t.split(' ')),
    'zero-width spaces': lambda t: ' '.join(w[:1] + '\u200b' + w[1:] for w in t.split(' ')),
}

def _disguised():
    out = {k: f(GSM_LIKE) for k, f in DISGUISES.items()}
    t = GSM_LIKE
    for f in DISGUISES.values(): t = f(t)
    out['all four'] = t
    assert all(v != GSM_LIKE for v in out.values())
    return {k: 'From a homework site: ' + v + ' Thanks!' for k, v in out.items()}


def test_unicode_disguised_copies_are_13gram_matches():
    "A verbatim copy disguised by each Unicode trick, and by all of them, is a 13-gram match: check, batch and workers."
    from phi4_nb.decontam import check_batch
    ix = DecontamIndex([Benchmark('gsm', [{'id': 'gsm/0', 'text': GSM_LIKE}, {'id': 'gsm/1', 'text': ' '.join(WORDS[:20])}])])
    docs = _disguised()
    want = {'status': 'contaminated', 'reason': '13-gram', 'items': ['gsm/0']}
    for name, t in docs.items():
        assert {k: ix.check(t)[k] for k in want} == want, name
    assert [{k: r[k] for k in want} for r in check_batch(ix, list(docs.values()))] == [want] * 5
    got = list(decontaminate([{'id': k, 'text': t} for k, t in docs.items()] + ['clean filler'] * 3, ix, progress=False,
                             workers=2, batch_size=2))
    assert [r['id'] for r in got[:5]] == list(docs)
    assert [{k: r[k] for k in want} for r in got[:5]] == [want] * 5 and got[5]['status'] == 'clean'


def test_load_refuses_an_index_of_another_format(tmp_path):
    ix = DecontamIndex([_bench(' '.join(WORDS[:20]))])
    ix.format = 1                                         # as saved before short items and the allowed list changed
    ix.save(tmp_path/'old.pkl')
    with pytest.raises(ValueError, match='rebuild'): DecontamIndex.load(tmp_path/'old.pkl')
    del ix.format                                         # indexes pickled by older versions have no format at all
    ix.save(tmp_path/'older.pkl')
    with pytest.raises(ValueError, match='format 1'): DecontamIndex.load(tmp_path/'older.pkl')
