"Loaders: clear errors on bad input, every format round-trips into the document dict, HTML extraction keeps math/code/tables."
import json
import pytest
from pathlib import Path
from phi4_nb.sources import (load_source, SOURCES, register_source, jsonl_docs, text_docs, parquet_docs, html_docs, hf_docs,
                             html_to_text, gsm8k_docs, math_docs, stdlib_docs, iter_jsonl)
from phi4_nb.core import data_root as default_data_root

def _is_doc(d): return isinstance(d, dict) and isinstance(d['id'], str) and isinstance(d['text'], str) and isinstance(d['source'], str)

def test_jsonl_ok(tmp_path):
    f = tmp_path / 'c.jsonl'
    f.write_text('{"id": "a", "text": "hello", "lang": "en"}\n\n{"body": "x", "text": "world"}\n')
    docs = list(load_source('jsonl', path=f))
    assert [d['text'] for d in docs] == ['hello', 'world'] and docs[0]['lang'] == 'en' and docs[1]['id'] == 'c-3'
    assert all(map(_is_doc, docs))
    assert [d['text'] for d in jsonl_docs(f, text_field=lambda r: r['text'].upper(), source='s')] == ['HELLO', 'WORLD']
    with pytest.raises(ValueError, match=r"c.jsonl:1: row has no 'body' field"): list(jsonl_docs(f, text_field='body'))

@pytest.mark.parametrize('bad, msg', [('{"text": "a"}\n{"text": "b",}\n', r"bad.jsonl:2: malformed JSON row"),
                                      ('{"text": "a"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object"),
                                      ('{"text": 3}\n', r"bad.jsonl:1: field 'text' is int"),
                                      ('\n\n', r"no rows"), ('', r"file is empty")])
def test_jsonl_errors(tmp_path, bad, msg):
    f = tmp_path / 'bad.jsonl'; f.write_text(bad)
    with pytest.raises(ValueError, match=msg): list(load_source('jsonl', path=f))

def test_missing_paths(tmp_path):
    for name in ('jsonl', 'text', 'parquet', 'html', 'hf'):
        with pytest.raises(FileNotFoundError, match='not found'): load_source(name, path=tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='PHI4_DATA'): gsm8k_docs(data_root=tmp_path / 'nope')
    with pytest.raises(FileNotFoundError, match='not found'): list(gsm8k_docs(data_root=tmp_path))  # root exists, no gsm8k/
    with pytest.raises(FileNotFoundError, match='organic.jsonl'): load_source('tinyworld', world_dir=tmp_path)

def test_make_doc_ids():
    from phi4_nb.sources import make_doc
    a, b = make_doc('same text', 'src'), make_doc('same text', 'src')
    assert a['id'] == b['id'] != make_doc('other', 'src')['id'] and a['id'].startswith('src-')
    with pytest.raises(TypeError): make_doc(b'bytes', 'src')

def test_unknown_source():
    with pytest.raises(ValueError, match=r"unknown source 'web'.*known sources:.*gsm8k.*tinyworld"): load_source('web')
    register_source('mine', lambda n=2: iter([{'id': str(i), 'text': 'x', 'source': 'mine'} for i in range(n)]))
    assert len(list(load_source('mine', n=3))) == 3
    del SOURCES['mine']

def test_text_and_empty_folder(tmp_path):
    (tmp_path / 'd').mkdir(); (tmp_path / 'd' / 'a.txt').write_text('A'); (tmp_path / 'd' / 'b.md').write_text('B')
    assert [d['text'] for d in text_docs(tmp_path / 'd')] == ['A']
    assert [d['text'] for d in text_docs(tmp_path / 'd', pattern='*')] == ['A', 'B']
    (tmp_path / 'e').mkdir()
    with pytest.raises(ValueError, match='no files'): text_docs(tmp_path / 'e')
    (tmp_path / 'd' / 'c.txt').write_bytes(b'\xff\xfe bad')
    with pytest.raises(ValueError, match='not valid UTF-8'): list(text_docs(tmp_path / 'd'))
    assert len(list(text_docs(tmp_path / 'd', errors='skip'))) == 1

def test_parquet(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({'id': ['x', 'y', 'z'], 'content': ['a', 'b', 'c'], 'score': [1, 2, 3]}), tmp_path / 'p.parquet')
    docs = list(parquet_docs(tmp_path / 'p.parquet', text_field='content', batch_size=2))
    assert [(d['id'], d['text'], d['score']) for d in docs] == [('x', 'a', 1), ('y', 'b', 2), ('z', 'c', 3)]
    with pytest.raises(ValueError, match="no column 'text'"): parquet_docs(tmp_path / 'p.parquet')

def test_hf_local(tmp_path):
    import datasets
    datasets.Dataset.from_dict({'text': ['u', 'v'], 'label': [0, 1]}).save_to_disk(str(tmp_path / 'ds'))
    docs = list(load_source('hf', path=tmp_path / 'ds'))
    assert [d['text'] for d in docs] == ['u', 'v'] and docs[1]['label'] == 1

HTML = """<html><head><title>Pythagoras &amp; friends</title><style>.x{color:red}</style><script>track()</script></head>
<body><div class="navbar"><a href="/">Home</a><a href="/b">Blog</a><a href="/c">Contact</a></div>
<div id="cookie-consent">This site uses cookies. <button>OK</button></div>
<article><h1>Right triangles</h1>
<p>For legs <i>a</i>, <i>b</i>: <math display="inline" alttext="a^{2}+b^{2}=c^{2}"><mi>a</mi><mo>+</mo></math>.
Inline MathJax <script type="math/tex">\\alpha_1</script> and KaTeX
<span class="katex"><math><semantics><mi>x</mi><annotation encoding="application/x-tex">\\sqrt{x}</annotation></semantics></math></span><span class="katex-html" aria-hidden="true">√x</span>.</p>
<img class="mwe-math-fallback-image-inline" alt="{\\displaystyle e^{i\\pi}+1=0}" src="x.svg">
<pre class="highlight"><code class="language-python"><span class="lineno">1</span>def hyp(a, b):
    # keep    the spacing
    return (a*a + b*b) ** 0.5</code></pre>
<table class="wikitable"><thead><tr><th>a</th><th>b</th><th>c</th></tr></thead>
<tbody><tr><td>3</td><td>4</td><td>5</td></tr><tr><td>5</td><td>12</td><td>13 | prime</td></tr></tbody></table>
<ul><li>first point</li><li>second point</li></ul>
</article><aside class="sidebar">Related posts</aside><footer>Copyright 2024</footer></body></html>"""

def test_html_extractor_keeps_math_code_tables():
    t = html_to_text(HTML)
    assert '$a^{2}+b^{2}=c^{2}$' in t and '$\\alpha_1$' in t and '$\\sqrt{x}$' in t and '$e^{i\\pi}+1=0$' in t
    assert '```python\ndef hyp(a, b):\n    # keep    the spacing\n    return (a*a + b*b) ** 0.5\n```' in t
    assert '| a | b | c |\n|---|---|---|\n| 3 | 4 | 5 |\n| 5 | 12 | 13 \\| prime |' in t
    assert '# Right triangles' in t and '- first point' in t
    for junk in ('track()', 'color:red', 'Home', 'cookies', 'Related posts', 'Copyright', '√x', 'Pythagoras'):
        assert junk not in t, junk

def test_html_keeps_article_header_and_forum_posts():
    page = ('<body><header class="site-header"><a href="/">Logo</a> Site name</header><main><article>'
            '<header><h1>Thread: sums</h1><span class="byline">by amber_fox</span></header>'
            '<div class="post"><div class="post-header">quill_k wrote:</div><p>How do I add 2 and 3?</p></div>'
            '<div class="post"><div class="post-header">amber_fox wrote:</div><p>It is 5.</p></div>'
            '</article></main><footer>Terms</footer></body>')
    t = html_to_text(page)
    assert '# Thread: sums' in t and 'by amber_fox' in t and 'quill_k wrote:' in t and 'It is 5.' in t
    assert 'Site name' not in t and 'Terms' not in t

def test_html_tolerates_broken_markup():
    t = html_to_text("<div><p>unclosed <b>bold <i>both</div></span><p>next")
    assert 'unclosed bold both' in t and 'next' in t

def test_html_docs(tmp_path):
    (tmp_path / 'p.html').write_text(HTML)
    [d] = list(html_docs(tmp_path))
    assert d['title'] == 'Pythagoras & friends' and '```python' in d['text']

def test_gsm8k_math_stdlib():
    root = default_data_root()  # the tests run with ../shared/data
    g = next(iter(gsm8k_docs(data_root=root)))
    assert _is_doc(g) and g['answer'] == g['solution'].rsplit('####', 1)[1].strip() and g['source'] == 'gsm8k'
    m = next(iter(load_source('math')))
    assert _is_doc(m) and '\\boxed' in m['text'] and m['level']
    s = list(stdlib_docs(max_files=5))
    assert len(s) == 5 and all(d['source'] == 'python-stdlib' and d['id'].endswith('.py') for d in s)

def test_tinyworld_source(tmp_path):
    from phi4_nb.world import build_world
    docs = list(load_source('tinyworld', seed=0, preset='tiny', n_docs=50))
    assert docs and all(map(_is_doc, docs)) and {'kind', 'is_noise', 'is_correct'} <= set(docs[0])
    build_world(tmp_path, 'tiny', n_docs=50)
    assert [d['text'] for d in load_source('tinyworld', world_dir=tmp_path)] == [d['text'] for d in docs]
