"""LLM backends: the engine against transformers on a real checkpoint, and the call cache across a kill.

Run: pytest tests/test_llm.py
"""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, torch
from phi4_nb.llm import Request, Reply, Backend, CallCache, EngineBackend, HFBackend
from phi4_nb.model import smollm2_checkpoint

torch.set_num_threads(2)


def test_engine_answers_smollm2_as_transformers_does():
    gguf = smollm2_checkpoint()
    ours, ref = EngineBackend.from_path(gguf), HFBackend.from_path(gguf)
    qs = [Request([dict(role="user", content="What is the capital of France?")], temperature=0, max_tokens=12,
                  logprobs=True),
          Request("def fibonacci(n):", temperature=0, max_tokens=12, logprobs=True, stop=["\n\n"])]
    a, b = ours.complete(qs), ref.complete(qs)
    for x, y in zip(a, b):
        assert x.ok and y.ok and x.texts == y.texts and x.finish_reasons == y.finish_reasons
        assert x.tokens == y.tokens
        assert torch.allclose(torch.tensor(x.logprobs[0]), torch.tensor(y.logprobs[0]), atol=2e-3)
    assert "Paris" in a[0].texts[0]


def test_sampled_answers_depend_on_the_seed_alone():
    gguf = smollm2_checkpoint()
    ours = EngineBackend.from_path(gguf)
    chat = [dict(role="user", content="Write a word.")]
    one = ours.complete([Request(chat, n=3, seed=11, max_tokens=8)])[0]
    mixed = ours.complete([Request("Once upon", seed=1, n=3, max_tokens=8), Request(chat, n=3, seed=11, max_tokens=8)])
    assert mixed[1].texts == one.texts and len(set(one.texts)) > 1


SLOW = textwrap.dedent("""
    import sys, time
    from phi4_nb.llm import Backend, Reply, Request
    class Slow(Backend):
        model_id, chunk = 'slow', 1
        def _complete(self, reqs):
            with open(sys.argv[2], 'a') as f: f.write(''.join(r.prompt + '\\n' for r in reqs))
            time.sleep(0.05)
            return [Reply([r.prompt.upper()], ['stop']) for r in reqs]
    out = Slow(cache=sys.argv[1]).generate([f'q{i}' for i in range(60)])
    print(len(out), out[0][0], out[-1][0])
""")


def test_a_killed_run_keeps_its_replies_and_repeats_no_call(tmp_path):
    script, db, log = tmp_path/"slow.py", tmp_path/"calls.sqlite", tmp_path/"sent.txt"
    script.write_text(SLOW)
    p = subprocess.Popen([sys.executable, str(script), str(db), str(log)])
    while not log.exists() or len(log.read_text().split()) < 20: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    first = log.read_text().split()
    assert 20 <= len(first) < 60
    out = subprocess.run([sys.executable, str(script), str(db), str(log)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["60", "Q0", "Q59"]
    sent = log.read_text().split()
    assert sorted(set(sent)) == sorted(f"q{i}" for i in range(60))
    assert len(sent) - 60 <= 1                                 # at most the call in flight at the kill is repeated
    assert len(CallCache(db)) == 60


def test_failures_are_rows_with_their_error_and_are_retried(tmp_path):
    class Flaky(Backend):
        model_id, chunk = "flaky", 1
        def __init__(self, cache): super().__init__(cache); self.down = True; self.calls = 0
        def _complete(self, reqs):
            self.calls += 1
            if self.down: raise TimeoutError("no answer in 120 s")
            return [Reply(["ok"], ["stop"]) for _ in reqs]
    b = Flaky(tmp_path/"c.sqlite")
    r = b.complete([Request("x")])[0]
    assert not r.ok and r.texts == [] and r.error == "TimeoutError: no answer in 120 s"
    assert CallCache(tmp_path/"c.sqlite").failures()[0]["error"] == r.error
    assert not b.complete([Request("x")], retry_failed=False)[0].ok and b.calls == 1
    b.down = False
    assert b.complete([Request("x")])[0].texts == ["ok"] and b.calls == 2
    assert CallCache(tmp_path/"c.sqlite").failures() == []
