"""A run in progress is claimed: a second launcher of the same grid (or of memssl-train, memssl-score or a removal run
on the same directory) leaves it to the first, and a claim left by a killed process is taken over."""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest

from memssl.data import write_fake_dataset
from memssl.io import DirLock, read_lock, lock_is_stale, LOCK_NAME
from memssl.rundir import is_complete

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def grid(d: Path, npz: Path, name: str, seeds=(3, 4), epochs=6) -> Path:
    f = d / f'{name}.yml'
    f.write_text(f"""runs_root: {d / name}
notebook: {ROOT / 'experiments' / 'sslmem.ipynb'}
base: {{dataset: 'npz:{npz}', n_shared: 60, n_candidates: 30, n_independent: 30, n_extra: 20, epochs: {epochs}, batch_size: 16,
        n_views: 4, n_probe_train: 100, n_probe_test: 40, probe_epochs: 5, knn_k: 10, device: cpu, parallel: false}}
grid: {{seed: {list(seeds)}}}
""")
    return f


def papermill_starts(rd: Path) -> int:
    "How many times a launcher started the run's notebook (one header line in log.txt each)."
    return sum(l.startswith('=== ') and ' papermill ' in l for l in (rd / 'log.txt').read_text().splitlines())


def wait_for(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, 'the launcher ended before the point the test waits for'
        assert time.time() - t0 < timeout, 'timed out'
        time.sleep(0.05)


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
    return write_fake_dataset('npz', tmp_path_factory.mktemp('locks'), n_train=160, n_test=40)


def test_two_launchers_of_one_grid_run_each_run_once(npz, tmp_path):
    g = grid(tmp_path, npz, 'twice', epochs=10)                         # long enough that the first run is surely running when the second looks
    first_run = tmp_path / 'twice' / 'npz-fake-simclr-small_cnn-s3'
    a = subprocess.Popen([str(BIN / 'memssl-grid'), str(g)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        wait_for(lambda: (first_run / LOCK_NAME).is_file(), a)             # the first launcher has claimed its first run
        time.sleep(0.5)       # the second starts while the first's kernel starts up (a fast machine can finish a tiny run in 3 s)
        b = subprocess.run([str(BIN / 'memssl-grid'), str(g)], capture_output=True, text=True, timeout=600)
        out_a = a.communicate(timeout=600)[0]
    finally:
        if a.poll() is None: os.killpg(a.pid, signal.SIGKILL)
    assert a.returncode == 0 and b.returncode == 0, out_a + b.stdout + b.stderr
    # the second launcher leaves the first's run to it
    assert 'npz-fake-simclr-small_cnn-s3: running' in b.stdout and 'running elsewhere: host' in b.stdout, b.stdout
    assert f'process {a.pid}' in b.stdout, b.stdout                        # the holder named: the first launcher's process
    assert '1 running elsewhere' in b.stdout, b.stdout                   # and took the other run itself (each ran once: below)
    assert 'without encryption' not in out_a + b.stdout + b.stderr           # kernels on IPC sockets: no plain-TCP warning
    assert not list((ROOT / 'experiments').glob('kernel-ipc*'))            # and their socket files are not left in the notebook's folder
    for seed in (3, 4):
        rd = tmp_path / 'twice' / f'npz-fake-simclr-small_cnn-s{seed}'
        assert is_complete(rd), seed
        assert papermill_starts(rd) == 1, (seed, (rd / 'log.txt').read_text()[-2000:])   # trained once, by one launcher
        assert not (rd / LOCK_NAME).exists(), seed                         # claims given up at the end


def test_claim_left_by_a_killed_launcher_is_taken_over(npz, tmp_path):
    g = grid(tmp_path, npz, 'killed', seeds=(5,))
    rd = tmp_path / 'killed' / 'npz-fake-simclr-small_cnn-s5'
    a = subprocess.Popen([str(BIN / 'memssl-grid'), str(g)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (rd / 'ckpt' / 'f' / 'last.pt').is_file(), a)      # inside f's training
        held = read_lock(rd)
        assert len(held['pids']) == 2 and held['pids'][0] == a.pid, held   # the launcher and the kernel that joined its claim
    finally:
        os.killpg(a.pid, signal.SIGKILL); a.wait()
    left = read_lock(rd)
    assert left is not None and left['token'] == held['token']            # SIGKILL left the claim behind
    t0 = time.time()                                                       # the kernel, in a session of its own, ends when it
    while not lock_is_stale(read_lock(rd)):                                # sees its launcher gone (within a few seconds)
        assert time.time() - t0 < 60, read_lock(rd)
        time.sleep(0.2)
    b = subprocess.run([str(BIN / 'memssl-grid'), str(g)], capture_output=True, text=True, timeout=600)
    assert b.returncode == 0 and 'complete' in b.stdout and 'running elsewhere' not in b.stdout, b.stdout + b.stderr
    assert is_complete(rd) and papermill_starts(rd) == 2 and read_lock(rd) is None


@pytest.fixture
def held(tmp_path):
    "A run directory claimed by this (live) test process."
    rd = tmp_path / 'held'
    lock = DirLock(rd).acquire()
    yield rd
    lock.release()


def test_memssl_train_refuses_a_claimed_run(npz, held):
    r = subprocess.run([str(BIN / 'memssl-train'), '--run-dir', str(held), '--set', f'dataset=npz:{npz}', '--set', 'epochs=1',
                        '--set', 'device=cpu'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f'being run elsewhere: claimed by host {socket.gethostname()}, process {os.getpid()}' in r.stderr, r.stderr
    assert sorted(p.name for p in held.iterdir()) == [LOCK_NAME]            # nothing written


def test_removal_grid_leaves_a_claimed_run_to_its_holder(npz, tmp_path):
    f = tmp_path / 'rm.yml'
    f.write_text(f"""experiment: removal
runs_root: {tmp_path / 'rm'}
base: {{dataset: 'npz:{npz}', probe_datasets: ['npz:{npz}'], n_pool: 60, n_extra: 20, n_canaries: 2, epochs: 1, batch_size: 16,
        n_views: 4, score_seeds: 2, fractions: [0.25], retrain_seeds: 1, device: cpu, parallel: false}}
""")
    ids = subprocess.run([str(BIN / 'memssl-grid'), str(f), '--dry-run'], capture_output=True, text=True).stdout
    rid = next(l.split(']')[1].split(':')[0].strip() for l in ids.splitlines() if 'would run' in l)
    with DirLock(tmp_path / 'rm' / rid):
        r = subprocess.run([str(BIN / 'memssl-grid'), str(f)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f'{rid}: running' in r.stdout and f'process {os.getpid()}' in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in (tmp_path / 'rm' / rid).iterdir()) == []   # nothing written, and our claim released


def test_memssl_score_leaves_a_claimed_audit_to_its_holder(npz, held, tmp_path):
    import torch
    for name, seed in (('f', 0), ('g', 1)):
        torch.save({'conv1.weight': torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(seed))}, tmp_path / f'{name}.pt')
    (tmp_path / 'split.json').write_text('{}')                               # never read: the claim is checked first
    r = subprocess.run([str(BIN / 'memssl-score'), '--f', str(tmp_path / 'f.pt'), '--g', str(tmp_path / 'g.pt'), '--split',
                        str(tmp_path / 'split.json'), '--dataset', f'npz:{npz}', '--arch', 'resnet18', '--run-dir', str(held)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f'is running elsewhere: host {socket.gethostname()}, process {os.getpid()}' in r.stdout, r.stdout
    assert sorted(p.name for p in held.iterdir()) == [LOCK_NAME]
