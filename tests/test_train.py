"""The trainer: exact resume after SIGKILL (its loss log and its evaluations), the same losses on 2 ranks (DDP over
gloo, torchrun) as on 1, the model under FSDP2 on 2 CPU ranks with the 1-rank losses, and clear errors for
checkpoints of another run.

Run: pytest tests/test_train.py
"""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

JOB = r'''
import sys, time, torch
from pathlib import Path
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.train import Trainer, TrainConfig

class Rows:
    "A global batch of fixed random rows per step; each rank takes its slice (what DDP needs to match 1 rank)."
    def __init__(self, batch, rank, world, vocab, T=32, steps=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (steps * batch, T + 1), generator=g)
        self.b, self.r, self.w, self.i = batch // world, rank, world, 0
        self.gb = batch
    def next_batch(self):
        rows = self.data[self.i * self.gb:(self.i + 1) * self.gb][self.r * self.b:(self.r + 1) * self.b]
        self.i += 1
        T = rows.shape[1] - 1
        return dict(input_ids=rows[:, :-1], labels=rows[:, 1:], position_ids=torch.arange(T).expand(len(rows), T))
    def state_dict(self): return dict(i=self.i, config=dict(batch=self.gb))
    def load_state_dict(self, s): self.i = s['i']

out, steps, slow = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rank, world = int(__import__('os').environ.get('RANK', 0)), int(__import__('os').environ.get('WORLD_SIZE', 1))
torch.manual_seed(0)
model = Phi4ForCausalLM(get_config('tiny', vocab_size=256))
loader = Rows(8, rank, world, 256)
if slow:                                               # time to be killed between steps
    nb = loader.next_batch
    loader.next_batch = lambda: (time.sleep(slow), nb())[1]
cfg = TrainConfig(steps=steps, warmup_steps=3, lr=3e-3, ckpt_every=4, grad_accum=2)
held = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
ev = lambda m: dict(loss=torch.nn.functional.cross_entropy(m(held[:, :-1]).flatten(0, 1), held[:, 1:].flatten()))
Trainer(model, loader, cfg, out, progress=False, evaluate=ev, eval_every=3).fit()
'''


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    p = tmp_path_factory.mktemp("job")/"job.py"; p.write_text(JOB); return p


def _rows(out):
    from phi4_nb.train import read_log
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_log(out)]


def _run(job, out, steps=12, slow=0.0, check=True):
    return subprocess.run([sys.executable, str(job), str(out), str(steps), str(slow)], check=check,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_run_killed_by_sigkill_resumes_to_the_same_loss_curve(job, tmp_path):
    _run(job, tmp_path/"whole")
    p = subprocess.Popen([sys.executable, str(job), str(tmp_path/"killed"), "12", "0.15"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path/"killed"/"log.csv"
    while not log.exists() or len(log.read_text().splitlines()) < 7:      # 6 steps logged: a checkpoint at 4 exists
        assert p.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert len(_rows(tmp_path/"killed")) < 12
    _run(job, tmp_path/"killed")                                             # the same command, again
    assert _rows(tmp_path/"killed") == _rows(tmp_path/"whole")               # bit for bit
    assert [r[0] for r in _rows(tmp_path/"whole")] == list(range(1, 13))
    from phi4_nb.train import read_evals                                     # evaluations after the checkpoint redone
    assert read_evals(tmp_path/"killed") == read_evals(tmp_path/"whole")
    assert [r["step"] for r in read_evals(tmp_path/"whole")] == [3, 6, 9, 12]
    left = sorted(x.name for x in (tmp_path/"killed"/"checkpoints").iterdir())
    assert left == ["step-00000008", "step-00000012"]                       # the newest two, no temporary folder


def test_two_ranks_give_the_one_rank_losses(job, tmp_path):
    _run(job, tmp_path/"one", steps=6)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", str(job), str(tmp_path/"two"), "6", "0"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _rows(tmp_path/"one"), _rows(tmp_path/"two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-5) and a[3] == pytest.approx(b[3], rel=1e-4)
    cfg = json.loads((tmp_path/"two"/"train_config.json").read_text())
    assert cfg["world_size"] == 2
    bad = _run(job, tmp_path/"two", steps=8, check=False)                    # 1 rank cannot resume a 2-rank run
    assert bad.returncode != 0 and "world_size" in bad.stderr and "belongs to another run" in bad.stderr


def test_corrupt_or_foreign_checkpoints_are_clear_errors(job, tmp_path):
    _run(job, tmp_path/"a", steps=4)
    meta = tmp_path/"a"/"checkpoints"/"step-00000004"/"trainer.json"
    m = json.loads(meta.read_text()); m["fingerprint"]["model"]["hidden_size"] = 7; meta.write_text(json.dumps(m))
    bad = _run(job, tmp_path/"a", steps=8, check=False)
    assert bad.returncode != 0 and "belongs to another run" in bad.stderr and "model" in bad.stderr
    meta.write_text("{not json")
    bad = _run(job, tmp_path/"a", steps=8, check=False)
    assert bad.returncode != 0 and "unreadable" in bad.stderr


def test_a_trainer_after_another_librarys_accelerator_in_the_same_process(tmp_path):
    """A notebook that ran a TRL trainer in bf16 (accelerate's state is a process-wide singleton) can still train."""
    from phi4_nb.config import get_config
    from phi4_nb.model import Phi4ForCausalLM
    from phi4_nb.train import Trainer, TrainConfig, read_log, _accelerator
    assert _accelerator("bf16").mixed_precision == "bf16"                 # what a TRL trainer in bf16 leaves behind
    ids = torch.randint(0, 256, (4, 17))

    class One:
        def next_batch(self): return dict(input_ids=ids[:, :-1], labels=ids[:, 1:])
        def state_dict(self): return dict(config={})
        def load_state_dict(self, s): pass
    t = Trainer(Phi4ForCausalLM(get_config("tiny", vocab_size=256)), One(), TrainConfig(steps=2, warmup_steps=1),
                tmp_path, progress=False)
    assert t.acc.mixed_precision == "no"
    t.fit()
    assert len(read_log(tmp_path)) == 2


FSDP_JOB = r'''
import os, sys, torch, torch.distributed as dist
from phi4_nb.config import get_config
from phi4_nb.model import Phi4ForCausalLM
from phi4_nb.train import lm_loss
world = int(os.environ.get('WORLD_SIZE', 1))
if world > 1:
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group('gloo')
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)
model = Phi4ForCausalLM(get_config('tiny', vocab_size=256))
if world > 1:                                   # FSDP2: each decoder layer, then the rest, sharded over the ranks
    for layer in model.model.layers: fully_shard(layer)
    fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
starts = torch.randint(0, 256, (4, 8, 1), generator=torch.Generator().manual_seed(0))
data = (starts + torch.arange(33)) % 256                  # counting rows: something to learn in four steps
losses = []
for step in range(4):
    rows = data[step][rank * 8 // world:(rank + 1) * 8 // world]
    loss, _ = lm_loss(model, dict(input_ids=rows[:, :-1], labels=rows[:, 1:]))
    loss.backward(); opt.step(); opt.zero_grad()
    l = loss.detach().clone()
    if world > 1: dist.all_reduce(l); l /= world
    losses.append(l.item())
if rank == 0: print(' '.join(map(repr, losses)))
if world > 1: dist.destroy_process_group()
'''


def test_fsdp2_shards_the_model_over_two_cpu_ranks_with_the_one_rank_losses(tmp_path):
    "The model under torch's FSDP2 (`fully_shard`, gloo): the 1-rank losses at the same global batch. accelerate "
    "itself enables FSDP only on accelerator devices, so on GPUs the trainer gets it from `accelerate launch --use_fsdp`."
    job = tmp_path/'fsdp.py'; job.write_text(FSDP_JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(job)], env=env, capture_output=True, text=True, check=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(job)], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a = [float(x) for x in one.stdout.split()]; b = [float(x) for x in two.stdout.split()]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
