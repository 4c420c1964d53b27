"Judges: HTTP endpoint (local server only), local generator, rule stand-ins, cache, judge-mixing guard."
import http.server, json, multiprocessing as mp, threading
from concurrent.futures import ThreadPoolExecutor
import pytest
from phi4_nb.judges import (HTTPJudge, GeneratorJudge, RuleJudge, FakeGenerator, JudgeCache, Verdict, cache_key,
                            one_judge, MixedJudgesError, math_equal, EQUALITY, SIMPLEQA, MC_EXTRACT, prompt_text)

class Server:
    "A tiny OpenAI-compatible server on 127.0.0.1: `script` is a list of (status, reply) served in order."
    def __init__(self, script, default=(200, "Yes")):
        self.script, self.default, self.requests = list(script), default, []
        outer = self
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                code, reply = outer.script.pop(0) if outer.script else outer.default
                out = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                               "finish_reason": "stop"}]}).encode()
                self.send_response(code); self.send_header("Content-Length", str(len(out)))
                self.send_header("Content-Type", "application/json"); self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(out)
            def log_message(self, *a): pass
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_port}/v1"
    def __enter__(self): threading.Thread(target=self.srv.serve_forever, daemon=True).start(); return self
    def __exit__(self, *a): self.srv.shutdown(); self.srv.server_close()

def test_http_judge_request_shape_and_retries():
    with Server([(500, ""), (429, ""), (200, "Yes")]) as s:
        j = HTTPJudge(s.url, "m1", "equality", api_key="k")
        v = j.judge("q", "1/2", "0.5")
    assert (v.label, v.raw, v.judge_id) == ("yes", "Yes", "http:m1@t0/equality-v1")
    assert len(s.requests) == 3
    path, headers, body = s.requests[-1]
    headers = {k.lower(): v for k, v in headers.items()}
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer k"
    assert body["model"] == "m1" and body["temperature"] == 0.0 and body["messages"][0]["role"] == "user"
    assert "1/2" in body["messages"][0]["content"] and "0.5" in body["messages"][0]["content"]

def test_http_judge_client_errors_are_not_retried():
    with Server([(400, "bad")]) as s:
        j = HTTPJudge(s.url, "m1", "equality")
        with pytest.raises(RuntimeError, match="BadRequestError"): j.judge("q", "1", "1")
    assert len(s.requests) == 1

def test_http_judge_gives_up():
    with Server([], default=(503, "")) as s:
        j = HTTPJudge(s.url, "m1", "equality", retries=2)
        with pytest.raises(RuntimeError, match="InternalServerError"): j.judge("q", "1", "1")
    assert len(s.requests) == 3                                   # the first try and two retries
    j = HTTPJudge("http://127.0.0.1:9/v1", "m1", "equality", retries=0, timeout=1)  # nothing listens
    with pytest.raises(RuntimeError, match="APIConnectionError"): j.judge("q", "1", "1")

def test_cache_hits_and_identity(tmp_path):
    db = tmp_path / "c.sqlite"
    with Server([], default=(200, "B")) as s:
        j = HTTPJudge(s.url, "m1", "simpleqa", cache=db)
        a, b = j.judge("q", "Vexa", "Mirtown"), j.judge("q", "Vexa", "Mirtown")
        j2 = HTTPJudge(s.url, "m2", "simpleqa", cache=db)      # another model: its own key
        c = j2.judge("q", "Vexa", "Mirtown")
    assert (a.cached, b.cached, c.cached) == (False, True, False) and len(s.requests) == 2
    assert a.label == b.label == "incorrect" and c.judge_id != a.judge_id
    assert len(JudgeCache(db)) == 2
    msgs = SIMPLEQA.render("q", "Vexa", "Mirtown")
    assert cache_key(j.id, msgs) != cache_key(j2.id, msgs)

def _hammer(args):
    path, worker = args
    c = JudgeCache(path)
    for i in range(200): c.put(f"k{i % 50}", "j", [{"i": i}], f"w{worker}")
    return [c.get(f"k{i}") for i in range(50)]

def test_cache_concurrent_threads_and_processes(tmp_path):
    db = str(tmp_path / "c.sqlite")
    JudgeCache(db)
    with mp.get_context("spawn").Pool(2) as pool:
        outs = pool.map(_hammer, [(db, 0), (db, 1)])
    with ThreadPoolExecutor(4) as ex: outs += list(ex.map(_hammer, [(db, w) for w in range(2, 6)]))
    assert len(JudgeCache(db)) == 50
    assert all(o == outs[0] for o in outs) and None not in outs[0]   # first writer wins, everyone agrees

def test_generator_judge():
    calls = []
    def reply(t, i, rng): calls.append(t); return "C" if "Gold answer: Vexa" in t else "A"
    j = GeneratorJudge(FakeGenerator(reply), "tiny-judge", "simpleqa")
    assert j.judge("q", "Vexa", "dunno").label == "not_attempted" and j.id == "local:tiny-judge@t0/simpleqa-v1"
    mc = GeneratorJudge(FakeGenerator(lambda t, i, r: "The final choice is (D)."), "x", MC_EXTRACT)
    assert mc.judge("q", "", "...").label == "D"

def test_rule_simpleqa():
    j = RuleJudge("simpleqa")
    cases = {"The capital is Vexa.": "correct", "vexa": "correct", "I don't know.": "not_attempted", "": "not_attempted",
             "It is Mirtown.": "incorrect", "Vexamoor": "incorrect"}
    for resp, want in cases.items(): assert j.judge("Capital?", "Vexa", resp).label == want, resp

def test_rule_equality():
    pairs = [("\\frac{1}{2}", "0.5", True), ("3", "3.0", True), ("x^2+2x+1", "(x+1)^2", True), ("\\sqrt{2}", "1.41", False),
             ("7", "8", False), ("\\{1,2\\}", "\\{2,1\\}", True), ("", "", False)]
    for ref, resp, want in pairs: assert math_equal(ref, resp) == want, (ref, resp)
    assert RuleJudge("equality").judge("", "10", "10").label == "yes"

def test_rule_judge_needs_a_rule():
    with pytest.raises(ValueError, match="no built-in rule"): RuleJudge("mc_extract")

def test_one_judge_guard():
    vs = [Verdict("yes", "Yes", "rule:a"), Verdict("no", "No", "rule:a")]
    assert one_judge(vs) == {"judge": "rule:a"}
    with pytest.raises(MixedJudgesError): one_judge(vs + [Verdict("yes", "Yes", "http:gpt-4o@t0/equality-v1")])
    with pytest.raises(MixedJudgesError):
        one_judge([{"judge_ids": {"simpleqa": "a", "equality": "e"}}, {"judge_ids": {"simpleqa": "b"}}])

def test_prompt_text_and_fake_generator_errors():
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    with pytest.raises(TypeError): prompt_text(3)
    with pytest.raises(ValueError): FakeGenerator(lambda t, i, r: "")(["a"], n=0)
