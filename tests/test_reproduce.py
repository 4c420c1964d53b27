"""The main job at `tiny`: every stage into a temporary artifacts folder, every report notebook through papermill,
skipping what did not change, rerunning what did, and naming the notebook and cell that fails.

Run: pytest tests/test_reproduce.py
"""
import json, time
from pathlib import Path
import pytest
from phi4_nb import reproduce as R

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    t0 = time.time()
    res = R.reproduce('tiny', root=root/'artifacts', reports_root=root/'reports')
    return root, res, time.time() - t0

def test_every_stage_and_report_runs(tiny):
    root, res, _ = tiny
    assert list(res['stages']) == list(R.MAIN)
    names = {p.stem for p in R.reports_dir().glob('*.ipynb') if not p.name.startswith('_')}
    assert names >= {'alg1_decontam', 'tab05_mixture', 'fig01_amc', 'tab01_simple_evals', 'tab06_longctx',
                     'bench_generate', 'bench_attention'}
    assert {s['name'] for s in res['reports']} == names
    out = root/'reports'/'tiny'
    for s in res['reports']:
        assert s['outputs'] and all((out/f).stat().st_size > 0 for f in s['outputs']), s
        assert (out/f"{s['name']}.ipynb").exists() and s['verdict'] and s['agrees'] in (True, False, None)
        figs = [f for f in s['outputs'] if f.endswith('.png')]
        assert all((out/f.replace('.png', '.svg')).exists() for f in figs)
    index = (out/'README.md').read_text()
    assert all(f"({n}.ipynb)" in index for n in names)
    assert res['stages']['evals']['sandbox']['canonical_passed'] == 164

def test_nothing_changed_nothing_runs(tiny, capsys):
    root, res, _ = tiny
    capsys.readouterr()
    files = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    again = R.reproduce('tiny', root=root/'artifacts', reports_root=root/'reports')
    assert again['reports'] == res['reports'] and again['stages'].keys() == res['stages'].keys()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('[')]
    assert lines and all(l.endswith('] up to date') for l in lines), lines
    assert {p: p.stat().st_mtime_ns for p in files} == files        # not one file rewritten

def test_partial_work_resumes_only_under_the_same_inputs(tmp_path, monkeypatch):
    calls, kill = [], [True]
    def stage(run, out, cfg):
        calls.append(sorted(p.name for p in out.iterdir()))
        (out/'partial.jsonl').write_text('x')
        if kill[0]: raise KeyboardInterrupt                       # a kill half-way
        return {}
    monkeypatch.setitem(R.STAGES, 'world', stage)
    run = R.Run('tiny', root=tmp_path)
    settings = lambda v: monkeypatch.setitem(R.STAGE_SETTINGS['tiny'], 'world', {'v': v})
    settings(1)
    with pytest.raises(KeyboardInterrupt): R.run_stage(run, 'world')
    settings(2); kill[0] = False
    R.run_stage(run, 'world')                                     # other inputs: the old partial file is gone
    assert calls == [['started.json'], ['started.json']]
    settings(3); kill[0] = True
    with pytest.raises(KeyboardInterrupt): R.run_stage(run, 'world')
    kill[0] = False
    R.run_stage(run, 'world')                                     # same inputs after a kill: it is kept
    assert calls[-1] == ['partial.jsonl', 'started.json'] and (tmp_path/'tiny'/'world'/'done.json').exists()

def test_a_change_upstream_reruns_what_is_below(tiny, monkeypatch):
    root, _, _ = tiny
    run = R.Run('tiny', root=root/'artifacts')
    before = {s: R.done_hash(run, s) for s in R.MAIN}
    monkeypatch.setitem(R.STAGE_SETTINGS['tiny'], 'longctx', {**R.STAGE_SETTINGS['tiny']['longctx'], 'n': 3})
    assert R.stage_hash(run, 'longctx') != before['longctx']          # its own settings changed
    assert R.stage_hash(run, 'evals') == before['evals']              # a sibling's did not
    (root/'artifacts'/'tiny'/'model'/'done.json').write_text(json.dumps({'config_hash': 'changed'}))
    assert R.stage_hash(run, 'evals') != before['evals']              # an upstream stage's hash did

def test_a_failing_report_names_the_notebook_and_the_cell(tmp_path):
    nb = dict(cells=[dict(cell_type='code', execution_count=None, id='a', metadata=dict(tags=['parameters']),
                          outputs=[], source="preset = 'x'\nartifacts = ''"),
                     dict(cell_type='code', execution_count=None, id='b', metadata={}, outputs=[], source="1 / 0")],
              metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    p = tmp_path/'broken_report.ipynb'; p.write_text(json.dumps(nb))
    with pytest.raises(RuntimeError, match=r"broken_report.ipynb failed in cell 2 \(`1 / 0`\): ZeroDivisionError"):
        R.run_report(R.Run('tiny', root=tmp_path/'a', reports=tmp_path/'r'), p)

def test_bad_input():
    with pytest.raises(ValueError, match='unknown stages'): R.reproduce('tiny', stages=['nope'], reports=[])
    with pytest.raises(ValueError, match='unknown reports'): R.reproduce('tiny', stages=[], reports=['nope'])
    with pytest.raises(ValueError): R.reproduce('no-such-preset', stages=[], reports=[])
    with pytest.raises(ValueError, match='kind'): R.write_summary('.', 'x', 't', 's', 'v', None, [], kind='other')

def test_ablations_build_their_own_data_and_arms(tiny):
    "The ablate stage: the easy-level data in its own folder, disjoint web halves, every arm's mixture and scores."
    root, res, _ = tiny
    m, d = res['stages']['ablate'], root/'artifacts'/'tiny'/'ablate'
    run = R.Run('tiny', root=root/'artifacts')
    cfg = R.STAGE_SETTINGS['tiny']['ablate']
    assert (d/'data'/'tiny'/'world'/'done.json').exists() and not (d/'data'/'tiny'/'tokenizer').exists()
    assert m['pools']['web'] > 0 and m['pools']['web_fresh'] > 0 and m['pools']['synthetic_fixed'] >= 50
    from phi4_nb.mixture import load_manifest
    man = load_manifest(d/'corpus')
    assert set(man['sources']) >= {'web', 'web_fresh', 'synthetic', 'synthetic_fixed', 'code', 'long', 'short'}
    assert set(m['arms']) == set(cfg['arms'])
    for name, a in m['arms'].items():
        assert abs(sum(a['mixture'].values()) - 1) < 1e-9 and abs(a['mixture']['code'] - 0.25) < 1e-9
        assert (d/'arms'/name/'hf'/'config.json').exists() and (d/'arms'/name/'scores.jsonl').exists()
        assert {'knowledge', 'arith'} <= set(a['mcq']) and a['loss']['arith'] > 0
    assert m['arms']['S']['mixture'] == {'synthetic': 0.75, 'code': 0.25}
    f2 = m['fig2']
    assert len(f2) == len(cfg['fig2']['epochs']) * len(cfg['fig2']['seeds'])
    assert all(set(r['mixture']) == {'synthetic_fixed', 'web_fresh'} and r['curve'] for r in f2.values())
    assert m['midtrain']['long']['rope_theta'] == 250000.0 and set(m['midtrain']) == {'base', 'long', 'short'}
    assert R.done_hash(run, 'ablate') is not None

def test_posttrain_matches_rollout_budgets_and_trains_arms(tiny):
    "The posttrain stage: every kept query searched, the baseline drawn with the rollouts PTS used, arms scored."
    from phi4_nb.core import read_jsonl
    root, res, _ = tiny
    m, d = res['stages']['posttrain'], root/'artifacts'/'tiny'/'posttrain'
    cfg = R.STAGE_SETTINGS['tiny']['posttrain']
    recs, whole = read_jsonl(d/'pts.jsonl'), __import__('json').loads((d/'whole.json').read_text())
    assert m['kept'] == m['queries'] == cfg['queries'] == len(recs)          # the tiny filter keeps every query
    assert [b['sampled'] for b in whole] == [-(-r['rollouts'] // 8) * 8 for r in recs] and m['pts_rollouts'] > 0
    assert all(r['rollouts'] >= cfg['pts']['n'] for r in recs)
    assert (d/'sft'/'hf'/'config.json').exists() and m['sft']['steps'] == cfg['sft']['steps']
    assert {'base', 'sft'} <= set(m['results']) and len(read_jsonl(d/'scores_sft.jsonl')) == cfg['heldout']
    for arm in ('pts', 'whole'):
        if m[f'{arm}_pairs']: assert m['results'][arm]['per_seed'] and (d/f'scores_{arm}.jsonl').exists()

def test_pts_benchmarks_run_on_the_tiny_preset(tiny):
    "pts_bench (ours against decode + re-encode + generate) and pts_yield (per estimator) write their rows."
    root, _, _ = tiny
    res = R.reproduce('tiny', stages=['pts_bench', 'pts_yield'], reports=[], root=root/'artifacts',
                      reports_root=root/'reports')['stages']
    sides = [r['side'] for r in res['pts_bench']['results']]
    assert sides == ['phi4_nb', 'peer'] and all(r['rollouts'] > 0 for r in res['pts_bench']['results'])
    ys = res['pts_yield']['results']
    assert [r['estimator'] for r in ys] == list(R.STAGE_SETTINGS['tiny']['pts_yield']['estimators'])
    assert all(r['rollouts'] > 0 and r['solutions'] == 2 for r in ys)
    assert (root/'artifacts'/'tiny'/'pts_yield'/'pts_yield.csv').exists()
