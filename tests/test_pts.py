"""Pivotal Token Search: exactly the pivotal tokens of policies whose p(success) is known, and a killed estimation
that resumes from its cache without repeating a rollout.

Run: pytest tests/test_pts.py
"""
import os, random, signal, sqlite3, subprocess, sys, time
from pathlib import Path
import pytest
from phi4_nb.pts import pivotal_token_search, split_point


def _policy(n_tokens, jumps, start):
    "p(success) after k completion tokens: `start` plus the jumps at positions < k; and a call counter."
    calls = []
    def p(ids):
        calls.append(tuple(ids)); k = len(ids) - 2
        return start + sum(d for pos, d in jumps.items() if pos < k)
    return p, calls


@pytest.mark.parametrize("seed", range(40))
def test_finds_exactly_the_pivotal_tokens_of_a_monotone_policy(seed):
    r = random.Random(seed)
    n = r.randint(1, 300)
    k = r.randint(0, 3)
    sign = r.choice([1, -1])
    pos = sorted(r.sample(range(n), min(k, n)))
    jumps = {p: sign * r.uniform(0.21, 0.3) for p in pos}
    small = {p: sign * r.uniform(0.0, 0.05) for p in r.sample(range(n), min(3, n)) if p not in jumps}
    start = 0.05 if sign > 0 else 0.95
    p, calls = _policy(n, {**jumps, **small}, start)
    logprobs = [-r.expovariate(1.0) for _ in range(n)] if seed % 2 else None
    found = pivotal_token_search([7, 7], list(range(1000, 1000 + n)), p, p_gap=0.2, logprobs=logprobs)
    assert [f['position'] for f in found] == pos
    assert all(f['token_id'] == 1000 + f['position'] for f in found)
    assert len(set(calls)) == len(calls)                            # each prefix estimated once
    assert len(calls) <= 2 + 2 * max(1, len(pos)) * (n.bit_length() + 1)   # a binary search, not a scan


def test_split_point_halves_the_log_probability():
    lps = [-1.0] * 10
    assert split_point(0, 10, lps) == 5 and split_point(0, 10) == 5
    assert split_point(0, 4, [-0.0, -0.0, -9.0, -0.0]) == 3
    with pytest.raises(ValueError): split_point(3, 4)


JOB = r'''
import sys, time, torch
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.pts import RolloutEstimator
torch.manual_seed(0)
policy = Phi4ForCausalLM(get_config('tiny', vocab_size=64)).eval()
def slow(prefix, rollout):
    time.sleep(float(sys.argv[2])); return bool(rollout) and rollout[0] % 2 == 0
est = RolloutEstimator(policy, None, slow, sys.argv[1], 'slow-even', n=16, chunk=8, max_tokens=2, max_batch=16)
est.estimate([[1, i] for i in range(12)])
print('sampled', est.sampled)
'''


def test_a_killed_estimation_resumes_without_repeating_rollouts(tmp_path):
    job = tmp_path/'job.py'; job.write_text(JOB)
    db = tmp_path/'rollouts.sqlite'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.Popen([sys.executable, str(job), str(db), '0.01'], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    count = lambda: sqlite3.connect(db).execute("SELECT COUNT(*) FROM rollouts").fetchone()[0] if db.exists() else 0
    t0 = time.time()
    while True:
        try: c = count()
        except sqlite3.OperationalError: c = 0                       # the table may not exist yet
        if c >= 32: break
        assert p.poll() is None and time.time() - t0 < 120, "the run ended before it could be killed"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    before = sqlite3.connect(db).execute("SELECT key, k, first, success FROM rollouts").fetchall()
    assert 32 <= len(before) < 12 * 16
    out = subprocess.run([sys.executable, str(job), str(db), '0'], env=env, capture_output=True, text=True, check=True)
    sampled = int(out.stdout.split()[-1])
    after = sqlite3.connect(db).execute("SELECT key, k, first, success FROM rollouts").fetchall()
    assert len(after) == 12 * 16 and sampled == 12 * 16 - len(before)   # only what was missing
    assert set(before) <= set(after)                                   # and what was there is untouched
    again = subprocess.run([sys.executable, str(job), str(db), '0'], env=env, capture_output=True, text=True,
                           check=True)
    assert again.stdout.split()[-1] == '0'
