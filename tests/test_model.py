"""Parity of phi4_nb.model with transformers' Phi3ForCausalLM and LlamaForCausalLM, and HF checkpoint round trips.

Run: pytest tests/test_model.py
"""
import os, json
import pytest, torch
from transformers import Phi3Config, Phi3ForCausalLM, LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
from phi4_nb.config import ModelConfig, get_config
from phi4_nb.model import Phi4ForCausalLM

torch.set_num_threads(2)

# (hidden, heads, kv_heads, layers, ffn, vocab): odd sizes and GQA ratios 1, 2, 3, 4, 8
SHAPES = [(64, 4, 1, 2, 160, 301), (96, 6, 2, 2, 250, 257), (72, 6, 3, 3, 130, 333), (48, 3, 3, 1, 77, 99), (128, 8, 1, 2, 200, 512)]


def _phi3(hidden, heads, kv, layers, ffn, vocab, theta=250000.0):
    cfg = Phi3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
                     original_max_position_embeddings=128, rope_theta=theta, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, sliding_window=None)
    if hasattr(cfg, 'rope_parameters') and isinstance(cfg.rope_parameters, dict):
        cfg.rope_parameters = {**cfg.rope_parameters, 'rope_theta': theta}
    torch.manual_seed(hidden + layers)
    m = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to ones: randomise them so the test can see a swapped norm
        for n, p in m.named_parameters():
            if 'norm' in n: p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize('shape', SHAPES)
def test_phi3_logits_match(shape):
    hf = _phi3(*shape)
    ours = Phi4ForCausalLM.from_hf(hf, attn_implementation='eager').eval()
    ids = torch.randint(0, shape[-1], (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        for impl in ('eager', 'sdpa'):
            ours.config.attn_implementation = impl
            assert (ours(ids) - ref).abs().max().item() < 1e-5, impl


def test_rope_theta_is_used():
    hf = _phi3(64, 4, 1, 2, 160, 301, theta=500.0)
    ours = Phi4ForCausalLM.from_hf(hf)
    assert ours.config.rope_theta == 500.0
    ids = torch.randint(0, 301, (1, 40))
    with torch.no_grad(): assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize('tied', [True, False])
def test_llama_import(tied):
    cfg = LlamaConfig(vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    ours = Phi4ForCausalLM.from_hf(hf).eval()
    assert ours.config.tie_word_embeddings == tied
    if tied: assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, 211, (3, 29))
    with torch.no_grad(): assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_save_load_roundtrip(tmp_path):
    ours = Phi4ForCausalLM(get_config('tiny', vocab_size=320)).eval()
    ours.save_hf(tmp_path/'ckpt')
    files = sorted(p.name for p in (tmp_path/'ckpt').iterdir())
    assert 'model.safetensors' in files and 'config.json' in files and 'generation_config.json' in files
    assert json.loads((tmp_path/'ckpt'/'config.json').read_text())['architectures'] == ['Phi3ForCausalLM']
    hf = AutoModelForCausalLM.from_pretrained(tmp_path/'ckpt', dtype=torch.float32).eval()
    back = Phi4ForCausalLM.from_hf(tmp_path/'ckpt')
    ids = torch.randint(0, 320, (2, 17))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-5
        assert torch.equal(back(ids), ours(ids))
    # a bf16 save keeps bf16 weights
    ours.save_hf(tmp_path/'bf16', dtype=torch.bfloat16)
    assert Phi4ForCausalLM.from_hf(tmp_path/'bf16').dtype == torch.bfloat16


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no checkpoint'): Phi4ForCausalLM.from_hf(tmp_path/'missing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no config.json'): Phi4ForCausalLM.from_hf(tmp_path/'empty')
    # an architecture we cannot represent
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'"): Phi4ForCausalLM.from_hf(gpt2)
    # Llama with attention biases
    lb = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, attention_bias=True))
    with pytest.raises(ValueError, match='attention_bias'): Phi4ForCausalLM.from_hf(lb)
    # shape mismatch: config says one thing, weights another
    ours = Phi4ForCausalLM(get_config('tiny', vocab_size=320))
    ours.save_hf(tmp_path/'ok')
    cfg = json.loads((tmp_path/'ok'/'config.json').read_text()); cfg['intermediate_size'] = 96
    (tmp_path/'ok'/'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='shape mismatch'): Phi4ForCausalLM.from_hf(tmp_path/'ok')


def test_packed_documents_all_impls():
    from phi4_nb.attention import available_implementations
    m = Phi4ForCausalLM(get_config('tiny')).eval()
    docs = [torch.randint(0, 1024, (1, n)) for n in (5, 9, 3)]
    packed = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        sep = torch.cat([m(d) for d in docs], 1)
        for impl in available_implementations():
            m.config.attn_implementation = impl
            assert (m(packed, position_ids=pos) - sep).abs().max().item() < 1e-5, impl
