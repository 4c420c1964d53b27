"""phi4_serve: the official openai client against the served tiny model; bad requests; batching; the command.

Run: pytest tests/test_serve.py
"""
import asyncio, json, socket, subprocess, sys, time
from pathlib import Path
import httpx, openai, pytest, torch
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.tokenizer import train_bpe, stdlib_texts
from phi4_nb.llm import EngineBackend, OpenAIBackend, Request
from phi4_nb.serve import make_app, serve_app

torch.set_num_threads(2)
CHAT = [dict(role="user", content="Say something.")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    tok = train_bpe(stdlib_texts(), vocab_size=1024)
    model = Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok)))
    path = tmp_path_factory.mktemp("ckpt")/"tiny"
    model.save_hf(path); tok.save_pretrained(path)
    return EngineBackend(model, tok, model_id="tiny"), path


@pytest.fixture(scope="module")
def app(tiny): return make_app(tiny[0], wait_ms=30)


@pytest.fixture(scope="module")
def server(app):
    with serve_app(app) as url: yield url


def test_official_client_gets_the_engines_answers(tiny, server):
    eb, c = tiny[0], openai.OpenAI(base_url=server, api_key="none")
    r = c.chat.completions.create(model="tiny", messages=CHAT, n=3, max_tokens=7, seed=4, temperature=0.9, logprobs=True)
    d = eb.complete([Request(CHAT, n=3, max_tokens=7, seed=4, temperature=0.9, logprobs=True)])[0]
    assert [x.message.content for x in r.choices] == d.texts and [x.index for x in r.choices] == [0, 1, 2]
    assert [t.logprob for t in r.choices[2].logprobs.content] == d.logprobs[2]
    assert r.usage.completion_tokens == sum(len(l) for l in d.logprobs) and r.object == "chat.completion"
    again = c.chat.completions.create(model="tiny", messages=CHAT, n=3, max_tokens=7, seed=4, temperature=0.9)
    assert [x.message.content for x in again.choices] == d.texts          # a seed is a promise
    t = c.completions.create(model="tiny", prompt=["import os", "class A:"], n=2, max_tokens=5, seed=1, logprobs=1,
                             stop=["\n"])
    d = eb.complete([Request(p, n=2, max_tokens=5, seed=1, temperature=1.0, stop=["\n"]) for p in ["import os", "class A:"]])
    assert [x.text for x in t.choices] == [s for rep in d for s in rep.texts] and [x.index for x in t.choices] == [0, 1, 2, 3]
    assert all("\n" not in x.text for x in t.choices) and len(t.choices[0].logprobs.tokens) >= 1
    assert [m.id for m in c.models.list()] == ["tiny"]


BAD = [("not json", 400), ({"model": "tiny"}, 400), ({"model": "tiny", "messages": []}, 400),
       ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
       ({"model": "tiny", "messages": CHAT, "n": 0}, 400), ({"model": "tiny", "messages": CHAT, "temperature": -1}, 400),
       ({"model": "tiny", "messages": CHAT, "top_p": 0}, 400), ({"model": "tiny", "messages": CHAT, "max_tokens": "lots"}, 400),
       ({"model": "tiny", "messages": CHAT, "stream": True}, 400), ({"model": "tiny", "messages": CHAT, "max_tokens": 10**6}, 400),
       ({"model": "other", "messages": CHAT}, 404), ({"model": "tiny", "messages": "hi"}, 400),
       ({"model": "tiny", "messages": [{"role": "user", "content": {"$gt": 1}}]}, 400)]


@pytest.mark.parametrize("body,status", BAD, ids=range(len(BAD)))
def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, body, status):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/chat/completions", content=data, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "server_error")
    ok = openai.OpenAI(base_url=server, api_key="none").chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_bad_completions_requests(server):
    for body in [{"model": "tiny", "prompt": "x", "echo": True}, {"model": "tiny", "prompt": ""},
                 {"model": "tiny", "prompt": "x", "logprobs": 99}]:
        r = httpx.post(f"{server}/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text


def test_concurrent_requests_are_batched(tiny, app, server):
    async def go():
        c = openai.AsyncOpenAI(base_url=server, api_key="none")
        rs = await asyncio.gather(*(c.completions.create(model="tiny", prompt=f"x{i} =", max_tokens=4, seed=i)
                                    for i in range(16)))
        await c.close(); return rs
    seen = len(app.state.batcher.batches)
    rs = asyncio.run(go())
    sizes = app.state.batcher.batches[seen:]
    assert sum(sizes) == 16 and max(sizes) > 1, sizes              # the server ran them in shared batches
    want = tiny[0].complete([Request(f"x{i} =", max_tokens=4, seed=i, temperature=1.0) for i in range(16)])
    assert [r.choices[0].text for r in rs] == [w.texts[0] for w in want]
    via = OpenAIBackend("tiny", server, concurrency=16).complete([Request(f"x{i} =", max_tokens=4, seed=i,
                                                                          temperature=1.0) for i in range(16)])
    assert [v.texts for v in via] == [w.texts for w in want]


def test_the_command_serves_a_checkpoint_on_loopback(tiny, tmp_path):
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    exe = Path(sys.executable).parent/"phi4_serve"
    p = subprocess.Popen([str(exe), "--model", str(tiny[1]), "--port", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200: break
            except httpx.TransportError: time.sleep(0.1)
        c = openai.OpenAI(base_url=url, api_key="none")
        assert [m.id for m in c.models.list()] == ["tiny"]
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, seed=3)
        want = tiny[0].complete([Request(CHAT, max_tokens=5, seed=3, temperature=1.0)])[0].texts
        assert [r.choices[0].message.content] == want
    finally:
        p.terminate(); out = p.communicate(timeout=30)[0]
    assert f"on http://127.0.0.1:{port}/v1" in out
