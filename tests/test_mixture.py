"""Mixture spec, token shards (resume, hashes, dtypes) and the packed loader (budget, ranks, exact resume), with bad inputs.

Run: pytest tests/test_mixture.py
"""
import json
import numpy as np
import pytest
import torch
from phi4_nb.mixture import (Mixture, SourceSpec, get_mixture, token_dtype, tokenize_source, build_corpus, load_manifest,
                             verify_corpus, PackedLoader)


class CharTok:
    "A character tokenizer with only .encode: ids 1..255, eos 0."
    def __init__(self, offset=1, size=256): self.offset, self.size = offset, size
    def encode(self, text): return [self.offset + (ord(c) % 255) for c in text]
    def __len__(self): return self.size


def _docs(prefix, n, rng_seed=0):
    r = np.random.default_rng(rng_seed)
    return [{'id': f'{prefix}/{i}', 'text': f'{prefix} doc {i} ' + 'abcdefgh'[: r.integers(1, 8)] * int(r.integers(1, 30))} for i in range(n)]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('corpus')
    build_corpus({'a': _docs('a', 60, 1), 'b': _docs('b', 25, 2), 'c': _docs('c', 9, 3)}, CharTok(), d, eos_id=0,
                 shard_tokens=500, progress=False, config={'preset': 'test'})
    return d


def test_phi4_table5_epochs():
    m = get_mixture('phi-4')
    assert [round(m.epochs(s.name), 1) for s in m.sources] == [1.2, 5.2, 13.8, 2.4, 1.7]
    assert m.tokens('synthetic') == pytest.approx(4e12)
    assert get_mixture('phi-4', total_tokens=1e12).epochs('synthetic') == pytest.approx(1.379, abs=1e-3)


@pytest.mark.parametrize('spec,msg', [({'a': (0.5, 10), 'b': (0.6, 10)}, 'sum to 1.1'),
                                       ({'a': (0.5, 10), 'b': (0.5, 0)}, "'b' has 0 unique tokens"),
                                       ({'a': (1.5, 10), 'b': (-0.5, 10)}, 'must be in'),
                                       ({}, 'at least one source')])
def test_bad_mixtures(spec, msg):
    with pytest.raises(ValueError, match=msg): Mixture.from_dict(spec, 1e9)


def test_mixture_misc_errors():
    with pytest.raises(ValueError, match='duplicate'): Mixture([SourceSpec('a', .5, 1), SourceSpec('a', .5, 1)], 10)
    with pytest.raises(ValueError, match='total_tokens'): Mixture.from_dict({'a': (1, 10)}, 0)
    with pytest.raises(ValueError, match='unknown mixture preset'): get_mixture('nope')
    with pytest.raises(KeyError, match='unknown source'): get_mixture()['books']


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100352) == np.uint32
    with pytest.raises(ValueError): token_dtype(0)


def test_uint32_shards_roundtrip(tmp_path):
    tok = CharTok(offset=70000, size=100352)
    e = tokenize_source(['hello', 'world!'], tok, tmp_path, 'big', eos_id=100257, progress=False)
    assert e['dtype'] == 'uint32'
    t = np.memmap(tmp_path/'big'/e['shards'][0]['bin'], dtype=np.uint32, mode='r')
    assert t[:5].tolist() == tok.encode('hello') and t[5] == 100257 and len(t) == 13


def test_bad_sources(tmp_path):
    tok = CharTok()
    with pytest.raises(ValueError, match="'e' has no documents"): tokenize_source([], tok, tmp_path, 'e', eos_id=0, progress=False)
    with pytest.raises(ValueError, match='empty ones'): tokenize_source(['', '  '], tok, tmp_path, 'e2', eos_id=0, progress=False)
    with pytest.raises(ValueError, match="'text'"): tokenize_source([{'body': 'x'}], tok, tmp_path, 'e3', eos_id=0, progress=False)
    with pytest.raises(ValueError, match='out of range'): tokenize_source(['x'], CharTok(size=50), tmp_path, 'e4', eos_id=0, progress=False)
    with pytest.raises(ValueError, match='eos'): tokenize_source(['x'], tok, tmp_path, 'e5', progress=False)
    with pytest.raises(ValueError, match='bad source name'): tokenize_source(['x'], tok, tmp_path, '../up', eos_id=0, progress=False)
    with pytest.raises(FileNotFoundError, match='manifest'): load_manifest(tmp_path/'nothing')


def test_resume_after_kill_is_byte_identical(tmp_path):
    docs = _docs('r', 80, 5)
    ref = build_corpus({'r': docs}, CharTok(), tmp_path/'ref', eos_id=0, shard_tokens=300, batch_docs=8, progress=False)

    def dying(n):
        for i, d in enumerate(docs):
            if i == n: raise KeyboardInterrupt
            yield d
    with pytest.raises(KeyboardInterrupt): build_corpus({'r': dying(50)}, CharTok(), tmp_path/'run', eos_id=0, shard_tokens=300, batch_docs=8, progress=False)
    done = sorted(p.name for p in (tmp_path/'run'/'r').glob('*.json'))
    assert done and '_source.json' not in done
    (tmp_path/'run'/'r'/'99999.bin').write_bytes(b'junk')            # a stray partial file is removed
    man = build_corpus({'r': docs}, CharTok(), tmp_path/'run', eos_id=0, shard_tokens=300, batch_docs=8, progress=False)
    assert man['sources'] == ref['sources']
    assert not (tmp_path/'run'/'r'/'99999.bin').exists()
    assert verify_corpus(tmp_path/'run') == 2 * len(man['sources']['r']['shards'])
    # a finished source is not read again (a function source is not even called)
    build_corpus({'r': lambda: 1/0}, CharTok(), tmp_path/'run', eos_id=0, shard_tokens=300, batch_docs=8, progress=False)


def test_resume_detects_changes(tmp_path):
    docs = _docs('s', 40, 6)
    with pytest.raises(KeyboardInterrupt):
        def g():
            for i, d in enumerate(docs):
                if i == 30: raise KeyboardInterrupt
                yield d
        tokenize_source(g(), CharTok(), tmp_path, 's', eos_id=0, shard_tokens=200, batch_docs=8, progress=False)
    with pytest.raises(ValueError, match='changed since'): tokenize_source(docs[1:], CharTok(), tmp_path, 's', eos_id=0, shard_tokens=200, batch_docs=8, progress=False)
    with pytest.raises(ValueError, match='another tokenizer'): tokenize_source(docs, CharTok(), tmp_path, 's', eos_id=3, shard_tokens=200, batch_docs=8, progress=False)


def test_verify_detects_tampering(tmp_path):
    build_corpus({'t': _docs('t', 10)}, CharTok(), tmp_path, eos_id=0, progress=False)
    p = next((tmp_path/'t').glob('*.bin'))
    b = bytearray(p.read_bytes()); b[0] ^= 1; p.write_bytes(bytes(b))
    with pytest.raises(ValueError, match='hash mismatch'): verify_corpus(tmp_path)


def test_manifest_contents(corpus):
    man = load_manifest(corpus)
    assert man['dtype'] == 'uint16' and man['config'] == {'preset': 'test'} and len(man['tokenizer']['sha256']) == 64
    assert man['n_tokens'] == sum(e['n_tokens'] for e in man['sources'].values())
    assert len(man['sources']['a']['shards']) > 1 and man['sources']['c']['n_docs'] == 9


MIX = {'a': 0.5, 'b': 0.3, 'c': 0.2}

def _loader(corpus, **kw):
    return PackedLoader(corpus, MIX, **{'total_tokens': 20_000, 'seq_len': 31, 'batch_size': 3, 'seed': 1, **kw})


@pytest.mark.parametrize('k', [0, 1, 7, 30])
def test_loader_exact_resume(corpus, k):
    full = list(_loader(corpus))
    a = _loader(corpus)
    for _ in range(k): a.next_batch()
    b = _loader(corpus); b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = list(b)
    assert len(rest) == len(full) - k
    for x, y in zip(rest, full[k:]):
        for key in ('input_ids', 'labels', 'position_ids', 'loss_mask'): assert torch.equal(x[key], y[key])
        assert x['sources'] == y['sources']


def test_loader_budget_epochs_and_packing(corpus):
    dl = _loader(corpus)
    batches = list(dl)
    assert len(batches) == len(dl) == 20_000 // (32 * 3)
    tot = sum(dl.drawn.values())
    assert tot == len(dl) * 3 * 32
    for k, f in MIX.items(): assert abs(dl.drawn[k] / tot - f) < 0.02
    man = load_manifest(corpus)
    assert dl.epochs()['c'] == pytest.approx(dl.drawn['c'] / man['sources']['c']['n_tokens'])
    assert dl.cursor['c'][0] >= 1                                  # the small source was repeated
    for bt in batches:
        ids, pos, lm = bt['input_ids'], bt['position_ids'], bt['loss_mask']
        assert ids.shape == pos.shape == lm.shape == (3, 31) and ids.dtype == torch.int64
        # a document starts right after every end-of-text (except at the very end of a row)
        after_eos = (ids[:, :-1] == 0)
        assert torch.equal(pos[:, 1:][after_eos], torch.zeros(int(after_eos.sum()), dtype=pos.dtype))
        assert torch.equal(lm[:, :-1], pos[:, 1:] != 0)
        assert ((pos[:, 1:] == pos[:, :-1] + 1) | (pos[:, 1:] == 0)).all()
    assert not torch.equal(batches[0]['input_ids'], list(_loader(corpus, seed=2))[0]['input_ids'])


def test_loader_ranks_disjoint(corpus):
    r = [_loader(corpus, rank=i, world_size=3) for i in range(3)]
    assert len({len(x) for x in r}) == 1
    for name in MIX:
        for e in (0, 1):
            seen = [set(x.perm(name, e).tolist()) for x in r]
            assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
            assert set().union(*seen) == set(range(load_manifest(corpus)['sources'][name]['n_docs']))
    assert not torch.equal(r[0].next_batch()['input_ids'], r[1].next_batch()['input_ids'])


def test_loader_bad_inputs(corpus):
    with pytest.raises(ValueError, match='unknown source'): PackedLoader(corpus, {'a': 0.5, 'books': 0.5}, total_tokens=1e4)
    with pytest.raises(ValueError, match='sum to'): PackedLoader(corpus, {'a': 0.5, 'b': 0.3}, total_tokens=1e4)
    with pytest.raises(ValueError, match='total_tokens is required'): PackedLoader(corpus, MIX)
    with pytest.raises(ValueError, match='less than one batch'): PackedLoader(corpus, MIX, total_tokens=10, seq_len=31)
    with pytest.raises(ValueError, match='rank'): _loader(corpus, rank=2, world_size=2)
    with pytest.raises(ValueError, match='fewer than world_size'): _loader(corpus, rank=0, world_size=10)
    with pytest.raises(ValueError, match='seed'): _loader(corpus).load_state_dict(_loader(corpus, seed=5).state_dict())
    with pytest.raises(FileNotFoundError): PackedLoader(corpus/'missing', MIX, total_tokens=1e4)
    # a Mixture in the report's terms works too: its fractions and total are used, unique tokens are measured
    m = Mixture.from_dict({'a': (0.5, 1e9), 'b': (0.3, 1e9), 'c': (0.2, 1e9)}, 5_000)
    dl = PackedLoader(corpus, m, seq_len=15, batch_size=2)
    assert dl.mixture['a'].unique_tokens == load_manifest(corpus)['sources']['a']['n_tokens']


def test_real_bytelevel_bpe_tokenizer(tmp_path):
    "A `tokenizers` ByteLevel BPE (batched path, <|endoftext|> found by name) and the project's HF wrapper give the same shards."
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    texts = [f'def f{i}(x):\n    return x * {i}  # item {i}' for i in range(200)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>'],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = raw.token_to_id('<|endoftext|>')
    e = tokenize_source(texts, raw, tmp_path, 'code', progress=False)
    assert e['eos_id'] == eos and e['n_docs'] == 200
    toks = np.memmap(tmp_path/'code'/e['shards'][0]['bin'], dtype=np.uint16, mode='r')
    off = np.load(tmp_path/'code'/e['shards'][0]['idx'])
    assert raw.decode(toks[off[5]:off[6] - 1].tolist()) == texts[5] and toks[off[6] - 1] == eos
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=raw)
    e2 = tokenize_source(texts, hf, tmp_path/'hf', 'code', progress=False)
    assert e2['shards'][0]['sha256'] == e['shards'][0]['sha256']  # same ids through the HF wrapper's batched path
