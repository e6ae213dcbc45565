"""No process of a run outlives it. A grid run (parallel training of f and g in spawned processes, scoring in the papermill
kernel) and a 2-rank torchrun run are killed at several points, in the ways a run dies in practice (SIGKILL of the launcher's
whole process group, as a scheduler or `kill -9 -PGID` does; SIGKILL or SIGTERM of the launcher alone; Ctrl-C). After a bounded
wait no process started for the run may remain, and the same command run again must complete (checked after the
group kill of each phase; the other ways of dying leave the same files).

Processes are found by a marker in their environment (`MEMSSL_TEST_MARK=<token>`, set on the launcher and inherited by every
descendant, whatever its name or parent), not by name. The grid's processes also carry the run's own claim
(`MEMSSL_RUN_LOCK=<run dir>\\t<token>`, set by the launcher for its kernel), which the test checks while the run is alive."""
import os, secrets, signal, subprocess, sys, time
from pathlib import Path

import pytest

from memssl.data import write_fake_dataset
from memssl.rundir import is_complete

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARK = 'MEMSSL_TEST_MARK'
GRACE_S = 30          # a run's processes must be gone this long after its launcher died (they poll every 0.5 s)


def environ(pid: int) -> dict:
    "A process's environment as it started (empty when it is gone, a zombie, or not ours to read)."
    try: raw = Path(f'/proc/{pid}/environ').read_bytes()
    except OSError: return {}
    return dict(kv.split('=', 1) for kv in raw.decode(errors='replace').split('\0') if '=' in kv)


def cmdline(pid: int) -> str:
    try: return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip()[:200]
    except OSError: return '?'


def state(pid: int) -> str:
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError): return 'X'


def marked(token: str) -> dict:
    "{pid: (environment, command line)} of the live processes carrying the test's marker (zombies count as gone)."
    out = {}
    for p in Path('/proc').iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid(): continue
        env = environ(int(p.name))
        if env.get(MARK) == token and state(int(p.name)) not in ('Z', 'X'): out[int(p.name)] = (env, cmdline(int(p.name)))
    return out


def wait_for(pred, proc, what: str, timeout=300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f'the launcher ended before {what}'
        assert time.time() - t0 < timeout, f'timed out waiting for {what}'
        time.sleep(0.1)


def assert_all_gone(token: str, started: dict):
    "Every marked process ends within GRACE_S seconds; otherwise name each survivor (and kill it, so the machine stays clean)."
    t0 = time.time()
    while (left := marked(token)) and time.time() - t0 < GRACE_S: time.sleep(0.25)
    for pid in left: os.kill(pid, signal.SIGKILL)
    assert not left, (f'{len(left)} process(es) of the killed run still alive after {GRACE_S} s: '
                      + '; '.join(f'pid {p}: {c}' for p, (_, c) in left.items())
                      + f' | processes seen while it ran: {sorted(c for _, c in started.values())}')


def grid_file(d: Path, npz: Path, name: str, epochs: int) -> Path:
    f = d / f'{name}.yml'
    f.write_text(f"""runs_root: {d / name}
notebook: {ROOT / 'experiments' / 'sslmem.ipynb'}
base: {{dataset: 'npz:{npz}', n_shared: 60, n_candidates: 30, n_independent: 30, n_extra: 20, epochs: {epochs}, batch_size: 16,
        n_views: 4, n_probe_train: 100, n_probe_test: 40, probe_epochs: 5, knn_k: 10, device: cpu, parallel: true}}
grid: {{seed: [3]}}
""")
    return f


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return write_fake_dataset('npz', tmp_path_factory.mktemp('orphans'), n_train=160, n_test=40)


def launch(cmd: list, token: str, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, MARK: token, 'OMP_NUM_THREADS': '1', **env})


def kill(proc: subprocess.Popen, how: str):
    if how == 'SIGKILL group': os.killpg(proc.pid, signal.SIGKILL)     # the launcher and all it started in its group
    elif how == 'SIGKILL launcher': os.kill(proc.pid, signal.SIGKILL)
    elif how == 'SIGTERM launcher': os.kill(proc.pid, signal.SIGTERM)
    elif how == 'Ctrl-C': os.killpg(proc.pid, signal.SIGINT)           # what a terminal sends its foreground group
    else: raise ValueError(how)
    try: proc.wait(timeout=60)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait()


# (phase, how): parallel training of f and g in spawned processes, and scoring in the kernel after training. SIGKILL of the
# launcher alone is the torchrun test's case; for a grid it acts as SIGTERM does (Python leaves SIGTERM at its default: death)
CASES = [('training', 'SIGKILL group'), ('training', 'SIGTERM launcher'),
         ('training', 'Ctrl-C'), ('scoring', 'SIGKILL group')]


@pytest.mark.parametrize('phase,how', CASES, ids=[f'{p}-{h.replace(" ", "_")}' for p, h in CASES])
def test_a_killed_grid_run_leaves_no_process_and_reruns(npz, tmp_path, phase, how):
    token = secrets.token_hex(8)
    g = grid_file(tmp_path, npz, 'k', epochs=12)
    rd = tmp_path / 'k' / 'npz-fake-simclr-small_cnn-s3'
    cmd = [str(BIN / 'memssl-grid'), str(g)]
    a = launch(cmd, token, tmp_path / 'a.log')
    seen = {}
    try:
        if phase == 'training':       # both spawned trainers have written a checkpoint: the kernel, its workers and helpers are up
            wait_for(lambda: (rd / 'ckpt' / 'f' / 'last.pt').is_file() and (rd / 'ckpt' / 'g' / 'last.pt').is_file(), a, 'parallel training')
        else:                         # both encoders are final and the run is not complete: the kernel is scoring or probing
            wait_for(lambda: (rd / 'ckpt' / 'f' / 'encoder.pt').is_file() and (rd / 'ckpt' / 'g' / 'encoder.pt').is_file(), a, 'scoring')
        seen = marked(token)
        kernels = [p for p, (env, c) in seen.items() if 'ipykernel' in c]
        assert len(kernels) == 1, seen
        assert environ(kernels[0]).get('MEMSSL_RUN_LOCK', '').startswith(str(rd.resolve()) + '\t'), 'the kernel carries the run marker'
        if phase == 'training':       # the kernel and its two trainers, at least
            assert len(seen) >= 4, seen
        assert not is_complete(rd)
    finally:
        kill(a, how)
    assert_all_gone(token, seen)
    if how != 'SIGKILL group': return      # the rerun after the other ways of dying resumes from the same files: checked once per phase
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, MARK: token})
    assert b.returncode == 0 and is_complete(rd), b.stdout[-3000:] + b.stderr[-3000:]
    assert not marked(token)


TRAIN_SET = ['--set', 'n_shared=60', '--set', 'n_candidates=32', '--set', 'n_independent=32', '--set', 'n_extra=16',
             '--set', 'batch_size=16', '--set', 'n_views=4', '--set', 'n_probe_train=64', '--set', 'n_probe_test=32',
             '--set', 'probe_epochs=2', '--set', 'knn_k=5', '--set', 'device=cpu', '--set', 'epochs=12']


@pytest.mark.parametrize('how', ['SIGKILL launcher', 'SIGKILL group'])
def test_a_killed_torchrun_run_leaves_no_rank_and_reruns(npz, tmp_path, how):
    "memssl-train under torchrun with 2 gloo ranks, killed during training: no rank survives the agent; the rerun completes."
    token = secrets.token_hex(8)
    rd = tmp_path / 'run'
    base = [str(BIN / 'torchrun'), '--standalone', '--nproc_per_node=2', str(BIN / 'memssl-train'),
            '--set', f'dataset=npz:{npz}', *TRAIN_SET, '--run-dir', str(rd)]
    a = launch(base, token, tmp_path / 'a.log')
    try:
        wait_for(lambda: (rd / 'ckpt' / 'f' / 'last.pt').is_file(), a, 'training under torchrun')
        seen = marked(token)
        ranks = [p for p, (env, _) in seen.items() if env.get('LOCAL_RANK') in ('0', '1')]
        assert len(ranks) == 2, seen
    finally:
        kill(a, how)
    assert_all_gone(token, seen)
    if how != 'SIGKILL group': return
    b = subprocess.run(base, capture_output=True, text=True,
                       timeout=600, env={**os.environ, MARK: token, 'OMP_NUM_THREADS': '1'})
    assert b.returncode == 0 and 'memssl-train: complete' in b.stdout, b.stdout[-3000:] + b.stderr[-3000:]
    assert not marked(token)
