"Curation: outlier fences, annotator interface, classifier vs baseline, dedup of planted copies, pipeline and JSONL resume."
import json, random
import numpy as np
import pytest
from phi4_nb.world import World, ground_truth_label, write_jsonl
from phi4_nb.curate import (text_stats, OutlierFilter, LLMAnnotator, annotate, hash_features, QualityClassifier,
                            train_quality_classifier, classification_report, NearDedup, text_hash, split_passages,
                            select_seeds, reasoning_score, curate, curate_jsonl, CurateConfig)

@pytest.fixture(scope='module')
def docs(): return World(seed=0, preset='tiny').documents()

def test_stats_extremes():
    rnd = random.Random(0)
    junk = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(2000))
    rep = "Loading...\n" * 100
    prose = "The river runs through the old town, and the market opens at dawn when the boats come in. " * 3
    s_junk, s_rep, s_prose = text_stats(junk), text_stats(rep), text_stats(prose)
    assert s_junk['compression'] > s_prose['compression'] > s_rep['compression']
    assert s_rep['dup_line_frac'] > 0.9 and s_junk['char_entropy'] > s_prose['char_entropy']
    assert 0 <= s_rep['top3_frac'] <= 1

def test_outlier_filter_catches_corruption_not_clean(docs):
    of = OutlierFilter.fit(d['text'] for d in docs)
    corrupt = [d for d in docs if d['style'] in ('binary', 'garbled', 'repetitive')]
    clean = [d for d in docs if not d['is_noise']]
    assert np.mean([bool(of.reasons(d['text'])) for d in corrupt]) > 0.9
    assert np.mean([bool(of.reasons(d['text'])) for d in clean]) < 0.03
    with pytest.raises(ValueError, match='empty'): OutlierFilter.fit([])

def test_annotator_interface(docs):
    seen = []
    def gen(prompts): seen.append(len(prompts)); return ["4" if "cheap" not in p else "score 1" for p in prompts]
    ann = LLMAnnotator(gen, batch_size=3)
    labels = annotate(ann, [dict(text="buy cheap stuff")] + [dict(text="fine text")] * 4)
    assert labels == [0, 1, 1, 1, 1] and seen == [3, 2]
    assert LLMAnnotator.parse("I'd say 2/5") == 2 and LLMAnnotator.parse("no idea") is None
    assert annotate(lambda d: None, docs[:3]) == [None] * 3
    with pytest.raises(ValueError, match='3 labels for 2'): annotate(LLMAnnotator(lambda p: ["1"] * 3), docs[:2])
    with pytest.raises(TypeError): annotate(42, docs[:2])

def test_hash_features_deterministic_and_normalised():
    i, v = hash_features("some text here"); i2, v2 = hash_features("some text here")
    assert (i == i2).all() and abs(float((v ** 2).sum()) - 1) < 1e-5 and i.max() < (1 << 18)
    assert len(hash_features("")[0]) == 0

def test_classifier_beats_trivial_baseline(docs):
    clf, rep = train_quality_classifier(docs, ground_truth_label, test_frac=0.3, epochs=80)
    assert rep['n'] > 100 and rep['accuracy'] > rep['baseline_accuracy'] + 0.03
    assert rep['drop']['f1'] > 0.5 and rep['baseline_drop']['f1'] == 0
    # noise pages are caught almost always
    noise = [d['text'] for d in docs if d['is_noise']]
    assert np.mean(clf.score(noise) < 0.5) > 0.8

def test_classifier_save_load(docs, tmp_path):
    texts = [d['text'] for d in docs[:200]]; y = [ground_truth_label(d) for d in docs[:200]]
    clf = QualityClassifier(epochs=10).fit(texts, y)
    clf.save(tmp_path / 'q.npz'); clf2 = QualityClassifier.load(tmp_path / 'q.npz')
    assert np.allclose(clf.score(texts[:20]), clf2.score(texts[:20]), atol=1e-5)
    with pytest.raises(ValueError, match='both classes'): QualityClassifier().fit(texts[:5], [1] * 5)
    with pytest.raises(ValueError, match='not fitted'): QualityClassifier().score(texts[:2])

def test_report_math():
    r = classification_report([1, 1, 0, 0], [0.9, 0.2, 0.1, 0.8])
    assert r['accuracy'] == 0.5 and r['keep'] == dict(precision=0.5, recall=0.5, f1=0.5, support=2)

def test_near_dedup_removes_planted_copies(docs):
    base = [d['text'] for d in docs if d['kind'] in ('forum', 'solution', 'code') and len(d['text'].split()) > 60 and not d['dup_of']][:40]
    rnd = random.Random(1); copies = []
    for t in base:
        w = t.split(" ")
        for _ in range(2): i = rnd.randrange(len(w)); w[i] = w[i].upper()
        copies.append("Reposted:\n" + " ".join(w) + "\nshare this")
    nd = NearDedup(threshold=0.7)
    assert all(nd.check(t, f"b{i}") is None for i, t in enumerate(base))
    hits = [nd.check(t, f"c{i}") for i, t in enumerate(copies)]
    assert sum(h == f"b{i}" for i, h in enumerate(hits)) >= 38
    assert text_hash("A  b\tC") == text_hash("a b c") != text_hash("a b d")

def _pair(j, rng, union=60, k=5):
    "Texts of distinct words whose k-shingle sets have Jaccard exactly j: own words first, then a shared run."
    inter = round(j * union); assert abs(inter - j * union) < 1e-9
    ws = [f"t{x}" for x in rng.sample(range(10 ** 8), union + k - 1)]
    own, shared = ws[:union - inter], ws[union - inter:]
    return " ".join(own[:len(own) // 2] + shared), " ".join(own[len(own) // 2:] + shared)

def _removed(j, n, seed=0, **kw):
    "Share of n pairs at Jaccard j whose second text a fresh NearDedup(**kw) reports as a copy of the first."
    from phi4_nb.curate import shingles
    rng, hit = random.Random(f"{seed}:{j}"), 0
    for _ in range(n):
        a, b = _pair(j, rng); sa, sb = shingles(a), shingles(b)
        assert len(sa | sb) == 60 and len(sa & sb) == round(60 * j)          # the construction is exact
        nd = NearDedup(**kw); assert nd.check(a, 'a') is None
        hit += nd.check(b, 'b') == 'a'
    return hit / n

def test_near_dedup_removal_curve_exact():
    "The default detector removes a pair iff its shingle Jaccard reaches 0.7 (the unverified one fails this)."
    n = 300
    for j in (0.3, 0.5, 0.55, 0.6, 0.65):
        assert _removed(j, n) <= 0.01, j
    assert _removed(0.7, n) >= 0.95
    for j in (0.75, 0.8, 0.9):
        assert _removed(j, n) >= 0.97, j

def test_near_dedup_removal_curve_minhash():
    "The low-memory detector verifies with the MinHash estimate: a ramp around 0.7, none far below, all far above."
    for j in (0.3, 0.5, 0.55):
        assert _removed(j, 300, verify='minhash') <= 0.01, j
    for j in (0.8, 0.9):
        assert _removed(j, 300, verify='minhash') >= 0.97, j
    assert 0.2 <= _removed(0.7, 300, verify='minhash') <= 0.8              # the estimate's noise splits pairs at 0.7

def test_lsh_params_and_curve():
    from phi4_nb.curate import lsh_params, lsh_curve
    assert lsh_params(0.7, 128) == (32, 4) and NearDedup().params == (32, 4)
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        for n in (64, 128, 256):
            b, r = lsh_params(t, n)
            assert b == n // r >= 2 and lsh_curve(t, b, r) >= 0.99 and lsh_curve(t, n // (r + 1), r + 1) < 0.99
    assert np.allclose(lsh_curve([0.0, 1.0], 32, 4), [0.0, 1.0]) and abs(lsh_curve(0.5, 2, 1) - 0.75) < 1e-12
    with pytest.raises(ValueError, match='no bands'): lsh_params(0.01, 128)
    with pytest.raises(ValueError, match='verify must be'): NearDedup(verify='approx')

def test_near_dedup_check_semantics():
    "check returns the most similar verified earlier key (ties: earliest), else indexes the text under its key."
    from phi4_nb.curate import jaccard, shingle_hashes
    q = [f"w{i}" for i in range(60)]
    x1, x2 = q[:57] + ["x", "y", "z"], [f"v{i}" for i in range(8)] + q[8:]
    sim = lambda u, v: jaccard(shingle_hashes(" ".join(u)), shingle_hashes(" ".join(v)))
    assert sim(q, x1) > sim(q, x2) >= 0.7 > sim(x1, x2)
    nd = NearDedup()
    assert [nd.check(" ".join(x), k) for x, k in [(x2, 'x2'), (x1, 'x1'), (q, 'q')]] == [None, None, 'x1']
    assert nd.n == 2 and nd.n_rejected >= 1                                 # x1 was a candidate of x2, rejected
    nd = NearDedup()
    assert nd.check("one two three four five six", None) is None and nd.check("One two three four five six!") == '0'
    y1, y2 = [f"b{i}" for i in range(8)] + q[8:], q[:52] + [f"a{i}" for i in range(8)]   # 0.75 with q each, 0.56 apart
    assert sim(q, y1) == sim(q, y2) and sim(y1, y2) < 0.7
    got = [nd.check(" ".join(x), k) for x, k in [(y1, 'y1'), (y2, 'a'), (q, 'q')]]
    assert got == [None, None, 'y1']                                        # a tie: the earliest, not the smallest key
    with pytest.raises(ValueError, match='already exists'): nd.check("entirely new words here now", 'a')
    nd = NearDedup(verify=None)                                             # unverified: any LSH candidate counts
    assert [nd.check(" ".join(x), k) for x, k in [(x2, 'x2'), (x1, 'x1')]] == [None, 'x2']
    docs = [dict(id='a', text=" ".join(q)), dict(id='b', text=" ".join(x2)), dict(id='c', text=" ".join(x1))]
    for verify, n_out in (('exact', 1), ('minhash', 1), (None, 1)):
        assert curate(docs, outliers=False, near_verify=verify, progress=False)[1]['n_out'] == n_out
    assert curate(docs[1:], outliers=False, progress=False)[1]['near_dup'] == 0            # x1 vs x2: 0.67 < 0.7

def test_curate_pipeline_removes_noise_and_reposts(docs):
    removed = []
    kept, st = curate(docs, classifier=None, progress=False, removed=removed)
    assert st['n_in'] == len(docs) and st['n_out'] == len(kept) == len(docs) - len(removed)
    assert set(st['rates']) == {'exact_dup', 'outlier', 'quality', 'near_dup'} and st['quality'] == 0
    why = dict(removed)
    planted = [d for d in docs if d['dup_of']]
    assert np.mean([d['id'] in why or d['dup_of'] in why for d in planted]) > 0.6
    corrupt = [d for d in docs if d['style'] in ('binary', 'garbled', 'repetitive')]
    assert np.mean([d['id'] in why for d in corrupt]) > 0.9
    assert curate([dict(id='a', text='x y z'), dict(id='b', text='X  y z')], outliers=False, progress=False)[1]['exact_dup'] == 1
    with pytest.raises(ValueError, match='document 1 is not'): curate([dict(id='a', text='x'), dict(text='no id')], outliers=False, progress=False)
    with pytest.raises(ValueError, match='document 0 is not'): curate(['plain string'], progress=False)

def test_seed_selection(docs):
    clf, _ = train_quality_classifier(docs, ground_truth_label, epochs=50)
    seeds, st = select_seeds(docs, clf.score, page_keep=0.3, passage_keep=0.5, page_threshold=0.0)
    assert st['pages_kept'] == int(np.ceil(len(docs) * 0.3)) and len(seeds) == st['seeds'] > 0
    _, st2 = select_seeds(docs, clf.score, page_threshold=0.5)
    assert st2['pages_kept'] == int((clf.score([d['text'] for d in docs]) >= 0.5).sum())
    by = {d['id']: d for d in docs}
    assert np.mean([ground_truth_label(by[s['doc_id']]) for s in seeds]) > np.mean([ground_truth_label(d) for d in docs])
    for s in seeds:
        lines = by[s['doc_id']]['text'].split("\n")
        assert s['text'] == "\n".join(lines[s['start_line'] - 1:s['end_line']]).strip()
    assert reasoning_score("so 3 + 4 = 7 because each box holds 7") > reasoning_score("lol thx bump!!")

def test_split_passages_ranges():
    text = "\n".join(f"para {i} " + "word " * 40 + "\n" for i in range(10))
    ps = split_passages(text, max_chars=500, min_chars=10)
    assert len(ps) > 2 and ps[0]['start_line'] == 1 and all(a['end_line'] < b['start_line'] for a, b in zip(ps, ps[1:]))

def test_curate_jsonl_atomic_and_resumable(docs, tmp_path):
    write_jsonl(tmp_path / 'in.jsonl', docs)
    s1 = curate_jsonl(tmp_path / 'in.jsonl', tmp_path / 'out.jsonl', progress=False)
    rows = [json.loads(l) for l in open(tmp_path / 'out.jsonl')]
    assert len(rows) == s1['n_out'] and not list(tmp_path.glob('.*.tmp'))
    mtime = (tmp_path / 'out.jsonl').stat().st_mtime_ns
    assert curate_jsonl(tmp_path / 'in.jsonl', tmp_path / 'out.jsonl', progress=False) == s1
    assert (tmp_path / 'out.jsonl').stat().st_mtime_ns == mtime
    s3 = curate_jsonl(tmp_path / 'in.jsonl', tmp_path / 'out.jsonl', near_dedup=False, progress=False)
    assert s3['config_hash'] != s1['config_hash'] and s3['near_dup'] == 0
    (tmp_path / 'bad.jsonl').write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON row"):
        curate_jsonl(tmp_path / 'bad.jsonl', tmp_path / 'o2.jsonl', progress=False)
    assert not (tmp_path / 'o2.jsonl').exists() and not list(tmp_path.glob('.o2*'))
    with pytest.raises(FileNotFoundError): curate_jsonl(tmp_path / 'none.jsonl', tmp_path / 'o3.jsonl')

def test_classifier_and_seed_files(docs, tmp_path):
    from phi4_nb.curate import train_classifier_jsonl, select_seeds_jsonl
    write_jsonl(tmp_path / 'c.jsonl', docs)
    r = train_classifier_jsonl(tmp_path / 'c.jsonl', tmp_path / 'q.npz', max_labels=300, epochs=30)
    assert r['n_labelled'] == 300 and r['n'] == 75 and (tmp_path / 'q.npz').exists()
    assert train_classifier_jsonl(tmp_path / 'c.jsonl', tmp_path / 'q.npz', max_labels=300, epochs=30) == r
    st = select_seeds_jsonl(tmp_path / 'c.jsonl', tmp_path / 's.jsonl', tmp_path / 'q.npz', page_keep=0.2)
    rows = [json.loads(l) for l in open(tmp_path / 's.jsonl')]
    assert len(rows) == st['seeds'] > 0 and {'id', 'text', 'doc_id', 'start_line', 'end_line', 'page_score', 'passage_score'} <= set(rows[0])
    with pytest.raises(FileNotFoundError): train_classifier_jsonl(tmp_path / 'nope.jsonl', tmp_path / 'x.npz')

def test_curate_leaves_input_untouched(docs):
    texts = [d['text'] for d in docs[:100]]; y = [ground_truth_label(d) for d in docs[:100]]
    clf = QualityClassifier(epochs=5).fit(texts, y)
    before = [dict(d) for d in docs[:100]]
    kept, _ = curate(docs[:100], classifier=clf, quality_threshold=0.0, progress=False)
    assert [dict(d) for d in docs[:100]] == before and all('quality' in d for d in kept)

def test_engine_adapter_for_llm_annotator():
    "The project's Engine plugs into LLMAnnotator through engine_generate_fn (duck-typed stand-in here)."
    from types import SimpleNamespace as NS
    from phi4_nb.curate import engine_generate_fn
    class FakeEngine:
        tokenizer = NS(decode=lambda ids, skip_special_tokens=True: "".join(map(str, ids)))
        def generate(self, prompts, params):
            assert params.temperature == 0 and params.max_tokens == 8 and prompts[0][0]['role'] == 'user'
            return [NS(completions=[NS(text=None, token_ids=[1] if 'cheap' in p[0]['content'] else [4])]) for p in prompts]
    ann = LLMAnnotator(engine_generate_fn(FakeEngine()))
    assert annotate(ann, [dict(text='buy cheap'), dict(text='The capital of X is Y.')]) == [0, 1]
