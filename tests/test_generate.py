"""The compiled path of the generation engine (`Engine(compile=True)`, `phi4_nb.compiled`) against the eager path.

Compiling takes a few seconds per shape on the tiny preset, so these tests keep to a handful of shapes.

Run: pytest tests/test_generate.py
"""
import warnings

import pytest
import torch

from phi4_nb import compiled as C
from phi4_nb.config import get_config
from phi4_nb.generate import Engine, SamplingParams
from phi4_nb.model import Phi4ForCausalLM

torch.set_num_threads(2)


def _model(seed=0):
    torch.manual_seed(seed)
    return Phi4ForCausalLM(get_config('tiny')).eval()


def _prompts(k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(k)]


def _ids(outs):
    return [[c.token_ids for c in o.completions] for o in outs]


def test_compiled_matches_eager_with_ragged_prompts_samples_and_stops():
    m = _model()
    prompts = _prompts(6)
    eager, comp = Engine(m), Engine(m, compile=True)
    greedy = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[])
    a, b = eager.generate(prompts, greedy), comp.generate(prompts, greedy)
    assert _ids(a) == _ids(b)
    lp_a = torch.tensor([x for o in a for x in o.completions[0].logprobs])
    lp_b = torch.tensor([x for o in b for x in o.completions[0].logprobs])
    torch.testing.assert_close(lp_b, lp_a, atol=1e-4, rtol=0)
    # n samples sharing a prefill, and stop tokens that end most rows early, so the compiled batch shrinks
    # (16 rows -> multiples of 8) while a few rows keep going; the frequent tokens of the greedy runs are the stops
    counts = torch.bincount(torch.tensor([t for r in _ids(a) for s in r for t in s]))
    stops = counts.topk(6).indices.tolist()
    sp = SamplingParams(n=4, temperature=0.0, max_tokens=24, stop_token_ids=stops)
    a, b = eager.generate(prompts[:4], sp), comp.generate(prompts[:4], sp)
    assert _ids(a) == _ids(b)
    assert [c.finish_reason for o in a for c in o.completions] == [c.finish_reason for o in b for c in o.completions]
    assert any(c.finish_reason == 'stop' for o in b for c in o.completions)
    # prompts of different lengths in separate chunks reuse one prefill graph and one decode graph
    from torch._dynamo.utils import counters
    chunked = Engine(m, max_batch=2, compile=True)
    order = sorted(range(6), key=lambda i: -len(prompts[i]))
    assert len({len(prompts[i]) for i in order[0::2]} | {len(prompts[i]) for i in order[1::2]}) > 2   # lengths differ
    graphs = counters['stats']['unique_graphs']
    assert _ids(chunked.generate(prompts, greedy)) == _ids(eager.generate(prompts, greedy))
    assert counters['stats']['unique_graphs'] - graphs <= 2, counters['stats']
    # sampling: the same per-sample random streams, so the same tokens wherever the logits agree to ~1e-6
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=8, stop_token_ids=[], seed=3)
    a, b = eager.generate(prompts[:3], sp), comp.generate(prompts[:3], sp)
    same = sum(x == y for ra, rb in zip(_ids(a), _ids(b)) for x, y in zip(ra, rb))
    assert same >= 5, (_ids(a), _ids(b))
    # top-p and top-k: the compiled step hands its logits to `sample_tokens` instead of sampling inside
    for sp in (SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=8, stop_token_ids=[], seed=4),
               SamplingParams(n=2, temperature=0.8, top_k=5, max_tokens=8, stop_token_ids=[], seed=5)):
        a, b = eager.generate(prompts[:3], sp), comp.generate(prompts[:3], sp)
        same = sum(x == y for ra, rb in zip(_ids(a), _ids(b)) for x, y in zip(ra, rb))
        assert same >= 5, (sp, _ids(a), _ids(b))


def test_compiled_engine_follows_weight_updates():
    m = _model(1)
    prompts = _prompts(3, seed=2)
    sp = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[])
    comp = Engine(m, compile=True)
    before = _ids(comp.generate(prompts, sp))
    steps = C.compile_steps(m)
    assert _ids(Engine(m, compile=True).generate(prompts, sp)) == before
    assert C.compile_steps(m) is steps                                    # engines of one model share the code
    with torch.no_grad():                      # an in-place update, as an optimizer step makes
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.05)
    with pytest.warns(UserWarning, match='compiling again'):
        after = _ids(comp.generate(prompts, sp))
    assert after == _ids(Engine(m).generate(prompts, sp))
    assert after != before


def test_bfloat16_decode_uses_inductor_gemms_and_matches_eager():
    from torch._dynamo.utils import counters
    class Choice:
        def __init__(self, name): self.name = name
    choices = [Choice('cpp_CppMicroGemmAMX_0'), Choice('_linear_pointwise')]
    assert C._prefer_cpp(choices) == choices                       # outside a decode step's compile: untouched
    C._IN_DECODE[0] = True
    try:
        assert [c.name for c in C._prefer_cpp(choices)] == ['cpp_CppMicroGemmAMX_0']
        assert C._prefer_cpp(choices[1:]) == choices[1:]           # no C++ GEMM for this one: keep what there is
    finally: C._IN_DECODE[0] = False
    m = _model(2).to(torch.bfloat16)
    prompts = _prompts(4, seed=3)
    sp = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[])
    before = counters['inductor']['cpp_templated_kernel_counter']
    a, b = Engine(m).generate(prompts, sp), Engine(m, compile=True).generate(prompts, sp)
    if 'max_autotune' in C.compile_options(m, decode=True):   # every projection of a decode step, and the head: AMX GEMMs
        assert counters['inductor']['cpp_templated_kernel_counter'] - before == 4 * m.config.num_hidden_layers + 1
    # bfloat16 rounds differently in the two paths: compare each sample up to the first differing token
    agree, total = 0, 0
    for x, y in zip(a, b):
        ta, tb = x.completions[0].token_ids, y.completions[0].token_ids
        k = next((i for i, (p, q) in enumerate(zip(ta, tb)) if p != q), len(ta))
        torch.testing.assert_close(torch.tensor(y.completions[0].logprobs[:k]), torch.tensor(x.completions[0].logprobs[:k]), atol=2e-2, rtol=0)
        agree, total = agree + k, total + len(ta)
    assert agree >= 0.75 * total, (_ids(a), _ids(b))


def test_unzeroed_cache_columns_are_never_read(monkeypatch):
    # with the decode kernel the engine skips zeroing its cache; fill the unwritten columns with NaN instead of leaving
    # whatever memory held, so that any read of them shows up in the tokens and log-probs
    from phi4_kernels import cpu
    if not cpu.available(): pytest.skip("no C++ compiler: the engine zeroes its cache")
    m = _model(3)
    made = []
    orig = Phi4ForCausalLM.new_cache
    def nan_cache(self, batch, max_len, zeroed=True):
        cache = orig(self, batch, max_len, zeroed)
        if not zeroed:
            for x in cache.k + cache.v: x.fill_(float('nan'))
        made.append(zeroed)
        return cache
    monkeypatch.setattr(Phi4ForCausalLM, 'new_cache', nan_cache)
    prompts = _prompts(5, seed=4)
    sp = SamplingParams(n=2, temperature=0.7, max_tokens=20, stop_token_ids=[], seed=1)
    a, b = Engine(m).generate(prompts, sp), Engine(m, compile=True).generate(prompts, sp)
    assert made == [True, False]
    lps = [x for o in b for c in o.completions for x in c.logprobs]
    assert all(x == x for x in lps)                                           # no NaN anywhere
    same = sum(x == y for ra, rb in zip(_ids(a), _ids(b)) for x, y in zip(ra, rb))
    assert same == 10, (_ids(a), _ids(b))


def test_setup_inductor_without_private_hooks(monkeypatch):
    # another torch may lack the private inductor API: the hooks are left out, nothing raises, no AMX template is asked for
    from torch._inductor import select_algorithm
    from torch._inductor.codegen.common import KernelTemplate
    monkeypatch.setattr(C, '_HOOKS', {})
    monkeypatch.delattr(select_algorithm, 'add_preprocessing_fn')
    monkeypatch.delattr(KernelTemplate, '_template_from_string')
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: True)
    assert C._setup_inductor() == {'prefer_cpp': False, 'memo_templates': False, 'amx': True}
    assert 'max_autotune' not in C.compile_options(_model().to(torch.bfloat16), decode=True)


def test_cached_forward_runs_the_model_layers_and_the_attention_dispatch(monkeypatch):
    # the compiled path's forward is the model's own layers: every attention call goes through phi4_nb.attention's
    # dispatch, a decode step (and the prefill's last layer, one query) as 'cpu_decode' where the kernel runs
    import phi4_nb.model as M
    calls = []
    def spy(q, k, v, impl='sdpa', **kw):
        calls.append((impl, q.shape[2]))
        return attention(q, k, v, impl, **kw)
    attention = M.attention
    monkeypatch.setattr(M, 'attention', spy)
    m, n = _model(4), get_config('tiny').num_hidden_layers
    cache = m.new_cache(2, C.cache_len(12)); cache.set_start(torch.tensor([3, 0]))
    rope = C.rope_table(m, cache.max_len)
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        C.cached_forward(m, ids, torch.tensor(0), cache.start, *C.cache_columns(cache, 8), rope)
        prefill, calls[:] = calls[:], []
        C.cached_forward(m, ids[:, :1], torch.tensor(8), cache.start, *C.cache_columns(cache, 16), rope)
    one = 'cpu_decode' if C.decode_kernel_on(torch.device('cpu')) else 'eager'
    assert prefill == [('sdpa', 8)] * (n - 1) + [(one, 1)]
    assert calls == [(one, 1)] * n


def test_compiled_engine_serves_many_batch_sizes_with_few_graphs():
    "Calls whose batch sizes all differ (more of them than dynamo's recompile limit) reuse graphs with a dynamic batch."
    from torch._dynamo.utils import counters
    m, prompts = _model(3), _prompts(12, seed=4)
    eager, comp = Engine(m), Engine(m, compile=True)
    sp = SamplingParams(max_tokens=4, stop_token_ids=[], temperature=0.0)
    comp.generate(prompts[:2], sp)                                        # the first graphs
    graphs = counters['stats']['unique_graphs']
    for k in range(3, 13):                                                # ten more batch sizes
        assert _ids(comp.generate(prompts[:k], sp)) == _ids(eager.generate(prompts[:k], sp))
    assert counters['stats']['unique_graphs'] - graphs <= 3, counters['stats']
