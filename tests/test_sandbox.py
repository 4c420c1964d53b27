"""Hostile programs against phi4_nb.sandbox: nothing may escape or outlive a run, real HumanEval solutions pass,
and a machine without the kernel layers says so.

Run: pytest tests/test_sandbox.py
"""
import os, shutil, socket, subprocess, sys, tempfile, textwrap, time, json, secrets, warnings
from pathlib import Path
import pytest
from phi4_nb import sandbox
from phi4_nb.sandbox import run_program, run_many, probe_layers, humaneval_program
from phi4_nb.sources import humaneval_problems as load_humaneval

LAYERS = probe_layers()
IN_EFFECT = run_program("pass").layers          # what a default run really gets here
FULL = {"pidns", "ipcns", "mountns", "rootfs", "quota"} <= set(IN_EFFECT)
needs_full = pytest.mark.skipif(not FULL, reason="needs the PID, IPC and mount namespaces (root or a user namespace)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

def prog(s): return textwrap.dedent(s)

def live_tasks_named(name):
    "Host threads called `name` that are not zombies (read from /proc, independently of the sandbox)."
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            for t in os.listdir(f"/proc/{d}/task"):
                with open(f"/proc/{d}/task/{t}/stat") as f: comm, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
                if comm == name and rest[0] not in "ZX": out.append(int(t))
        except OSError: pass
    return out

def sysv_keys():
    keys = set()
    for f in ("/proc/sysvipc/shm", "/proc/sysvipc/msg"):
        with open(f) as fh: keys |= {int(l.split()[0]) for l in list(fh)[1:] if l.strip()}
    return keys

# --- the basics ---------------------------------------------------------------------------------------------------

def test_plain_pass_and_fail():
    assert run_program("assert sum([1, 2]) == 3").status == "passed"
    assert run_program("assert sum([1, 2]) == 4").status == "failed"
    assert run_program("def f(:\n  pass").status == "failed"     # syntax error is the program's fault

def test_infinite_loop_and_sleep_time_out():
    assert run_program("while True: pass", timeout=1).status == "timeout"
    assert run_program("import time; time.sleep(60)", timeout=1).status == "timeout"

def test_full_isolation_here_is_reported_as_such():
    r = run_program("pass")
    if FULL:
        assert r.isolation == "full" and r.missing == [], r
        assert "pyguard" not in r.layers                       # no Python patches where the kernel does the job

# --- the cases of the hardening issue: each failed on the earlier sandbox --------------------------------------------

@needs_full
def test_zombie_leader_with_a_live_thread_does_not_outlive_the_run():
    name = "zl" + secrets.token_hex(4)
    r = run_program(prog(f"""
        import ctypes, os, threading, time
        if os.fork() == 0:
            if os.fork() == 0:
                os.setsid()
                def spin():
                    ctypes.CDLL(None).prctl(15, b"{name}", 0, 0, 0)
                    while True: time.sleep(0.01)
                threading.Thread(target=spin).start(); time.sleep(0.2)
                ctypes.CDLL(None).syscall(60 if os.uname().machine == "x86_64" else 93, 0)   # SYS_exit: the leader only
            os._exit(0)
        time.sleep(0.5)
    """))
    assert r.status == "passed", r
    assert live_tasks_named(name) == []

@needs_full
def test_sysv_ipc_objects_do_not_outlive_the_run():
    key = 0x51000000 + secrets.randbelow(1 << 20)
    r = run_program(prog(f"""
        import ctypes
        libc = ctypes.CDLL(None)
        assert libc.shmget({key}, 1 << 20, 0o1666) >= 0 and libc.msgget({key}, 0o1666) >= 0
    """))
    assert r.status == "passed", r
    assert key not in sysv_keys()

def test_deep_directory_chain_neither_crashes_cleanup_nor_loses_the_batch(tmp_path):
    deep = "import os\nfor _ in range(1500): os.mkdir('d'); os.chdir('d')\nos.chmod('.', 0)"
    rs = run_many([deep, "assert 1", "assert 0"], workers=2, progress=False, base_dir=str(tmp_path), timeout=20)
    assert [r.status for r in rs] == ["passed", "passed", "failed"], rs
    assert all(r.cleanup_error is None for r in rs) and os.listdir(tmp_path) == []

@needs_full
def test_the_work_area_has_a_size_limit():
    r = run_program(prog("""
        import os
        n = 0
        try:
            for i in range(100):
                with open(f"f{i}", "wb") as f: f.write(b"x" * (4 << 20)); n += 4
        except OSError: pass
        try:
            for i in range(100):
                with open(f"/tmp/t{i}", "wb") as f: f.write(b"x" * (4 << 20)); n += 4
        except OSError: pass
        print(n)
    """), disk_mb=32, timeout=20)
    assert r.status == "passed" and int(r.stdout) <= 32, r        # work dir and /tmp share the one quota

@needs_full
def test_host_processes_are_invisible():
    token = secrets.token_hex(16)
    keeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token], env={"T": token})
    try:
        r = run_program(prog("""
            import os
            for d in os.listdir("/proc"):
                for f in ("cmdline", "environ"):
                    try: print(open(f"/proc/{d}/{f}", "rb").read())
                    except Exception: pass
            print(len([d for d in os.listdir("/proc") if d.isdigit()]), "processes")
        """), tail_chars=1 << 20)
    finally: keeper.kill(); keeper.wait()
    assert r.status == "passed" and token not in r.stdout, r
    assert r.stdout.strip().endswith("2 processes")               # the namespace's init and the program

def test_a_disarmed_exit_cannot_turn_a_failure_into_a_pass():
    p0 = load_humaneval()[0]
    wrong = "    return False\nimport os, sys\nos._exit = sys.exit = lambda *a: None\n"
    assert run_program(humaneval_program(p0, wrong)).status == "failed"
    assert run_program(humaneval_program(p0, p0["canonical_solution"])).status == "passed"

@needs_root
def test_fallback_layers_are_reported_and_warned_and_block_the_other_names(tmp_path):
    "Without namespaces (and, as root, without a uid of its own) the Python guard covers posix.* and _socket too."
    canary = tmp_path / "c.txt"; canary.write_text("alive")
    code = prog(f"""
        import posix, _socket
        for what, fn in (("unlink", lambda: posix.unlink({str(canary)!r})), ("socket", lambda: _socket.SocketType()),
                         ("fork", posix.fork), ("open", lambda: posix.open({str(canary)!r}, posix.O_WRONLY))):
            try: fn(); raise SystemExit("escaped: " + what)
            except PermissionError: pass
    """)
    none = dict(mountns=False, netns=False, ipcns=False, pidns=False, utsns=False, uid=False, userns=False)
    sandbox._WARNED.clear()
    with pytest.warns(sandbox.SandboxWarning, match="degraded"):
        r = run_program(code, layers=none)
    assert r.status == "passed" and canary.read_text() == "alive", r
    assert r.isolation == "degraded" and {"pidns", "netns", "mountns", "rootfs", "uid|nocaps"} <= set(r.missing)
    assert {"pyfiles", "nofork", "nosocket", "pyguard"} <= set(r.layers)
    assert run_program("pass", layers=dict(netns=False)).missing == ["netns"]

@needs_full
def test_stragglers_are_counted_even_when_their_leader_is_a_zombie():
    r = run_program(prog("""
        import ctypes, os, threading, time
        if os.fork() == 0:
            threading.Thread(target=lambda: time.sleep(60)).start(); time.sleep(0.1)
            ctypes.CDLL(None).syscall(60 if os.uname().machine == "x86_64" else 93, 0)
        time.sleep(0.4)
    """))
    assert r.status == "passed" and r.stragglers == 1, r

READ_KEYS = '''
import ctypes
libc = ctypes.CDLL(None); buf = ctypes.create_string_buffer(4096)
s = libc.syscall(KEYCTL, 0, -3, 0); n = libc.syscall(KEYCTL, 11, s, buf, 4096)
for k in [int.from_bytes(buf.raw[i:i + 4], "little") for i in range(0, max(n, 0), 4)]:
    libc.syscall(KEYCTL, 11, k, buf, 4096); print(buf.value)
print(open("/proc/keys").read())
libc.syscall(ADD_KEY, b"user", b"planted", b"x", 1, -3)
'''

CALLER = '''
import ctypes, json, sys
sys.path[:0] = PATH
libc = ctypes.CDLL(None)
assert libc.syscall(KEYCTL, 1, b"phi4-test-session") > 0          # KEYCTL_JOIN_SESSION_KEYRING
assert libc.syscall(ADD_KEY, b"user", b"phi4-secret", TOKEN.encode(), 32, -3) > 0
from phi4_nb.sandbox import run_program
r = run_program(PROGRAM)
print(json.dumps(dict(out=r.stdout, layers=r.layers, planted="planted" in open("/proc/keys").read())))
'''

@needs_root
def test_the_callers_session_keyring_is_out_of_reach():
    "A caller with a secret in its session keyring (a login, a container, a service): the program sees none of it."
    nr = dict(x86_64=(248, 250), aarch64=(217, 219)).get(os.uname().machine)
    if nr is None: pytest.skip("key syscall numbers known for x86-64 and arm64 only")
    token, fill = secrets.token_hex(16), lambda s: s.replace("ADD_KEY", str(nr[0])).replace("KEYCTL", str(nr[1]))
    caller = (f"PATH, TOKEN, PROGRAM = {sys.path!r}, {token!r}, {fill(READ_KEYS)!r}\n") + fill(CALLER)
    out = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, timeout=60)
    res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else pytest.fail(out.stderr[-2000:])
    assert token not in res["out"] and "phi4-secret" not in res["out"] and not res["planted"], res
    assert "keyring" in res["layers"]

def test_a_lone_surrogate_is_the_programs_error_not_the_callers():
    assert run_program('x = "\ud800"\nassert False').status == "failed"

@needs_full
def test_seccomp_is_what_contains_these_attacks():
    "The same programs escape with the filter (and the control group) off: the layers, not luck, contain them."
    from phi4_nb.sandbox import ATTACKS, red_team
    names = {"memfd-flood", "vsock", "io-uring", "inotify", "nested-tmpfs", "keyring-plant"}
    pick = [a for a in ATTACKS if a.name in names]
    off = red_team(pick, layers=dict(seccomp=False, cgroup=False), progress=False)
    assert not any(r["contained"] for r in off), off
    assert all(r["contained"] for r in red_team(pick, progress=False))

# --- limits -------------------------------------------------------------------------------------------------------

def test_memory_blowup_fails_cleanly():
    r1 = run_program("x = bytearray(8 << 30)", memory_mb=512)
    r2 = run_program("l = []\nwhile True: l.append(bytearray(10**7))", memory_mb=512, timeout=5)
    assert r1.status == "failed" and "MemoryError" in r1.stderr
    assert r2.status in ("failed", "timeout")

def test_big_file_is_capped():
    assert run_program("open('big', 'wb').write(b'x' * (64 << 20))", max_file_mb=4).status == "failed"

@needs_root
def test_fork_bomb_is_contained_and_killed():
    r = run_program(prog("""
        import os
        while True:
            try: os.fork()
            except OSError: pass
    """), timeout=2, max_procs=8)
    assert r.status == "timeout"
    assert sandbox._pids_of_uid(r.uid) == []

@needs_root
def test_uid_layer_alone_stops_raw_writes(tmp_path):
    "Without the mount namespace a uid of its own still stops raw (ctypes) writes into a directory others cannot write."
    os.chmod(tmp_path, 0o755)
    if not os.access("/usr/bin/python3", os.X_OK): pytest.skip("needs an interpreter outside /root")
    if any(sandbox._blocked_ancestor(p) for p in sandbox._prefixes(sys.executable)):
        with pytest.raises(ValueError): run_program("pass", layers=dict(mountns=False, uid=True))
    canary = tmp_path / "c"; canary.write_text("alive")
    r = run_program(prog(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.open(b"{tmp_path}/new", os.O_WRONLY | os.O_CREAT, 0o644), libc.unlink(b"{canary}"))
    """), layers=dict(mountns=False, uid=True), python="/usr/bin/python3")
    assert "uid" in r.layers and "mountns" not in r.layers and r.stdout.split() == ["-1", "-1"], r
    assert canary.read_text() == "alive" and sorted(os.listdir(tmp_path)) == ["c"]

# --- the harness ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)\nassert False",
    "raise SystemExit(0)\nassert False",
    "import os\nos._exit(0)\nassert False",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nimport sys; sys.exit(0)",
    "import sys\nsys.stdout.close()\nassert 1",          # breaking the wrapper's own streams
])
def test_premature_exit_never_passes(code):
    assert run_program(code).status == "failed"

def test_known_limit_reading_the_nonce_pipe_forges_a_pass():
    "Documented limit: the marker catches premature exits, not a program that reads the harness's own pipe."
    r = run_program(prog("""
        import os, json
        cfg = json.loads(open("/proc/self/cmdline", "rb").read().split(b"\\0")[4])
        os.write(cfg["res_fd"], b"DONE " + os.read(cfg["nonce_fd"], 64) + b"\\n")
        os._exit(0)
    """))
    assert r.status == "passed"     # if this ever fails, the limit was closed: update the notebook's prose

def test_workdir_env_and_cleanup():
    r = run_program(prog("""
        import os, tempfile, json
        print(json.dumps(dict(cwd=os.getcwd(), env=dict(os.environ), tmp=tempfile.gettempdir())))
        open("scratch.txt", "w").write("fine")
    """))
    assert r.status == "passed"
    info = json.loads(r.stdout)
    assert info["cwd"] == r.workdir == info["env"]["TMPDIR"] == info["tmp"]
    assert set(info["env"]) <= {"PATH", "HOME", "TMPDIR", "TMP", "TEMP", "LANG", "PYTHONDONTWRITEBYTECODE", "LC_CTYPE"}
    assert not os.path.exists(r.workdir)

def test_nothing_left_behind(tmp_path):
    rs = [run_program(c, base_dir=str(tmp_path)) for c in ("open('x', 'w').write('1')", "while True: pass",
                                                           "import os; os._exit(0)")]
    assert [r.status for r in rs] == ["passed", "timeout", "failed"]
    assert os.listdir(tmp_path) == [] and all(not os.path.exists(r.workdir) for r in rs)
    n_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5): run_program("pass")
    assert len(os.listdir("/proc/self/fd")) == n_fds                 # no descriptor leaks

def test_remove_tree_handles_depth_beyond_path_max_and_locked_dirs(tmp_path):
    top = tmp_path / "t"; top.mkdir(); cwd = os.getcwd()
    try:
        os.chdir(top)
        for _ in range(600): os.mkdir("x" * 100); os.chdir("x" * 100)     # 60,000 characters deep
        os.chmod(".", 0)
    finally: os.chdir(cwd)
    assert sandbox._remove_tree(str(top)) is None and not top.exists()
    assert sandbox._remove_tree(str(top)) is None                          # already gone: nothing to say

def test_setup_failure_is_error_not_failed():
    assert run_program("pass", memory_mb=8).status == "error"        # the interpreter cannot even start its wrapper

def test_bad_input():
    with pytest.raises(TypeError): run_program(b"print(1)")
    with pytest.raises(ValueError, match="disk_mb"): run_program("pass", disk_mb=0)
    with pytest.raises(TypeError, match="items"): run_many(["pass", None], progress=False)
    with pytest.raises(FileNotFoundError): load_humaneval("/nonexistent/HumanEval.jsonl")

def test_humaneval_canonical_all_pass_and_wrong_ones_fail():
    probs = load_humaneval()
    assert len(probs) == 164
    t0 = time.monotonic()
    res = run_many([humaneval_program(p, p["canonical_solution"]) for p in probs], workers=4, timeout=10, progress=False)
    dt = time.monotonic() - t0
    bad = [(p["task_id"], r.status, r.stderr[-300:]) for p, r in zip(probs, res) if not r.passed]
    assert bad == []
    print(f"\nHumanEval canonical: 164 programs in {dt:.1f}s = {164 / dt:.1f} programs/s")
    wrong = ["    return None\n", "    pass\n", "    return 0\n", "    raise NotImplementedError\n", "    return (\n"]
    res = run_many([humaneval_program(p, w) for p, w in zip(probs[:5], wrong)], workers=4, progress=False)
    assert [r.status for r in res] == ["failed"] * 5
    tweaked = [p["canonical_solution"].replace("return ", "return 1 + ", 1) for p in probs[10:14]]
    res = run_many([humaneval_program(p, c) for p, c in zip(probs[10:14], tweaked)], workers=4, progress=False)
    assert not any(r.passed for r in res)

# --- the red team: every hostile program of the catalogue, one test each ----------------------------------------------

@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from phi4_nb.sandbox import RedTeamHost
    with RedTeamHost(str(tmp_path_factory.mktemp("host"))) as h: yield h

def _attacks(): return getattr(sandbox, "ATTACKS", [])

@needs_full
@pytest.mark.parametrize("attack", _attacks(), ids=lambda a: a.name)
def test_red_team_attack_is_contained(attack, host):
    from phi4_nb.sandbox import red_team
    [row] = red_team([attack], base_dir=host.base_dir, progress=False)
    assert row["contained"], row

def test_red_team_catalogue_is_broad():
    from phi4_nb.sandbox import ATTACKS
    assert len(ATTACKS) >= 30 and len({a.name for a in ATTACKS}) == len(ATTACKS)
    assert {a.group for a in ATTACKS} == {"files", "processes", "memory", "network", "harness", "privilege"}

@needs_root
def test_red_team_refuses_to_attack_our_own_processes():
    from phi4_nb.sandbox import red_team
    with pytest.raises(RuntimeError, match="refusing"):
        red_team(layers=dict(uid=False, userns=False, pidns=False), progress=False)

# --- an ordinary user: the same cage through a user namespace --------------------------------------------------------

@needs_root
def test_unprivileged_user_gets_full_isolation_through_a_user_namespace():
    "The sandbox module (standard library only) run by `nobody` with the system Python, red team included."
    py, setpriv = "/usr/bin/python3", shutil.which("setpriv")
    if not (setpriv and os.access(py, os.X_OK)): pytest.skip("needs setpriv and /usr/bin/python3")
    tmp_path = Path(tempfile.mkdtemp(prefix="phi4-nobody-", dir="/tmp")); os.chmod(tmp_path, 0o777)
    try: _as_nobody(py, setpriv, tmp_path)
    finally: shutil.rmtree(tmp_path, ignore_errors=True)

def _as_nobody(py, setpriv, tmp_path):
    shutil.copy(sandbox.__file__, tmp_path / "sbx.py")
    script = tmp_path / "run.py"
    script.write_text(prog(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import sbx
        layers = sbx.probe_layers()
        if not layers["userns"]: print(json.dumps(dict(skip=True))); raise SystemExit
        r = sbx.run_program("import os; print(os.getuid())")
        rows = sbx.red_team(base_dir={str(tmp_path)!r}, progress=False)
        print(json.dumps(dict(r=r.to_dict(), escaped=[x for x in rows if not x["contained"]], n=len(rows))))
    """))
    out = subprocess.run([setpriv, "--reuid", "65534", "--regid", "65534", "--clear-groups", py, str(script)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    res = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else pytest.fail(out.stderr[-2000:])
    if res.get("skip"): pytest.skip("no unprivileged user namespaces on this machine")
    r = res["r"]
    assert r["status"] == "passed" and r["missing"] == [] and "nocaps" in r["layers"] and "uid" not in r["layers"], r
    assert r["stdout"].strip() == "0"                           # our uid, as the namespace's root without capabilities
    assert all(x["needed_layer_missing"] for x in res["escaped"]) and res["n"] >= 30, res["escaped"]
