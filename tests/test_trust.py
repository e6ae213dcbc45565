"""Determinism and interruption: the same parameters and seed give the same scores on the CPU, and a run killed
at any point, started again with the same command, ends with the results of an uninterrupted one."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest

from memssl.data import write_fake_dataset
from memssl.rundir import is_complete
from memssl.runs import RunResult

ROOT = Path(__file__).resolve().parent.parent
GRID = Path(sys.executable).parent / 'memssl-grid'


def grid(d: Path, npz: Path, root: str, epochs=6) -> Path:
    f = d / f'{root}.yml'
    f.write_text(f"""runs_root: {d / root}
notebook: {ROOT / 'experiments' / 'sslmem.ipynb'}
base: {{dataset: 'npz:{npz}', n_shared: 60, n_candidates: 30, n_independent: 30, n_extra: 20, epochs: {epochs}, batch_size: 16,
        n_views: 4, n_probe_train: 100, n_probe_test: 40, probe_epochs: 5, knn_k: 10, device: cpu, parallel: false}}
grid: {{seed: [3]}}
""")
    return f


def run_dir(d: Path, root: str) -> Path:
    return next((d / root).iterdir())


def results(rd: Path) -> tuple:
    r = RunResult(rd)
    m = {k: v for k, v in r.metrics.items() if k != 'timings'}
    return r.scores, pd.read_csv(rd / 'scores_all.csv'), json.dumps(m, sort_keys=True)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('trust')
    npz = write_fake_dataset('npz', d, n_train=160, n_test=40)
    assert subprocess.run([str(GRID), str(grid(d, npz, 'ref'))], capture_output=True, text=True).returncode == 0
    return d, npz, results(run_dir(d, 'ref'))


def assert_same(a, b):
    pd.testing.assert_frame_equal(a[0], b[0], check_exact=True)
    pd.testing.assert_frame_equal(a[1], b[1], check_exact=True)
    assert a[2] == b[2]


def test_same_parameters_and_seed_give_identical_scores(data):
    d, npz, ref = data
    assert subprocess.run([str(GRID), str(grid(d, npz, 'again'))], capture_output=True, text=True).returncode == 0
    assert_same(results(run_dir(d, 'again')), ref)


def wait_for(pred, proc, timeout=240):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, 'the run ended before the point it was to be killed at'
        assert time.time() - t0 < timeout, 'timed out waiting for the kill point'
        time.sleep(0.05)


# kill points: inside f's training (after its first checkpoint), inside g's training, after scoring (before the probes)
KILL_AT = {
    'training f': lambda rd: (rd / 'ckpt' / 'f' / 'last.pt').is_file(),
    'training g': lambda rd: (rd / 'ckpt' / 'g' / 'last.pt').is_file(),
    'after scoring': lambda rd: (rd / 'scores.csv').is_file(),
}


@pytest.mark.parametrize('point', list(KILL_AT))
def test_killed_run_resumes_to_the_uninterrupted_result(data, point):
    d, npz, ref = data
    name = 'kill-' + point.replace(' ', '-')
    g = grid(d, npz, name)
    proc = subprocess.Popen([str(GRID), str(g)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (d / name).is_dir() and any((d / name).iterdir()) and KILL_AT[point](run_dir(d, name)), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    rd = run_dir(d, name)
    assert not is_complete(rd), 'the run finished before it was killed'
    r = subprocess.run([str(GRID), str(g)], capture_output=True, text=True)     # the same command again
    assert r.returncode == 0 and 'complete' in r.stdout, r.stdout + r.stderr
    assert_same(results(rd), ref)


def removal_grid(d: Path, npz: Path, root: str) -> Path:
    f = d / f'{root}.yml'
    f.write_text(f"""experiment: removal
runs_root: {d / root}
notebook: {ROOT / 'experiments' / 'removal.ipynb'}
base: {{dataset: 'npz:{npz}', probe_datasets: ['npz:{npz}'], n_pool: 60, n_extra: 20, n_canaries: 2, epochs: 3, batch_size: 16,
        n_views: 4, score_seeds: 2, fractions: [0.25], retrain_seeds: 2, n_probe_train: 100, n_probe_test: 40, probe_epochs: 5,
        knn_k: 10, device: cpu, parallel: false}}
""")
    return f


def removal_results(rd: Path) -> tuple:
    m = json.loads((rd / 'metrics.json').read_text()); m.pop('timings', None)
    return pd.read_csv(rd / 'scores.csv'), pd.read_csv(rd / 'removal.csv'), json.dumps(m, sort_keys=True)


@pytest.fixture(scope='module')
def removal_ref(data):
    d, npz, _ = data
    assert subprocess.run([str(GRID), str(removal_grid(d, npz, 'rm-ref'))], capture_output=True, text=True).returncode == 0
    return removal_results(run_dir(d, 'rm-ref'))


REMOVAL_KILL_AT = {
    'cross-fitting': lambda rd: (rd / 'crossfit' / 'scores_seed0.csv').is_file(),       # one score seed done, the other not
    'retraining': lambda rd: any((rd / 'removal').glob('*/last.pt')) if (rd / 'removal').is_dir() else False,
}


@pytest.mark.parametrize('point', list(REMOVAL_KILL_AT))
def test_killed_removal_run_resumes_to_the_uninterrupted_result(data, removal_ref, point):
    d, npz, _ = data
    name = 'rm-kill-' + point
    g = removal_grid(d, npz, name)
    proc = subprocess.Popen([str(GRID), str(g)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (d / name).is_dir() and any((d / name).iterdir()) and REMOVAL_KILL_AT[point](run_dir(d, name)), proc, timeout=400)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    rd = run_dir(d, name)
    assert not is_complete(rd)
    r = subprocess.run([str(GRID), str(g)], capture_output=True, text=True)
    assert r.returncode == 0 and 'complete' in r.stdout, r.stdout + r.stderr
    got = removal_results(rd)
    pd.testing.assert_frame_equal(got[0], removal_ref[0], check_exact=True)
    pd.testing.assert_frame_equal(got[1], removal_ref[1], check_exact=True)
    assert got[2] == removal_ref[2]


TARGET = Path(sys.executable).parent / 'memssl-target'


def target_cmd(d: Path, name: str) -> list:
    "A target audit of the reference run's f (parallel off: the kill point is one reference's training)."
    src = run_dir(d, 'ref')
    return [str(TARGET), '--set', f'source_run={src}', '--set', 'n_refs=2', '--set', 'n_views=4', '--set', 'n_population=40',
            '--set', 'device=cpu', '--set', 'parallel=false', '--set', f'run_dir={d / name}']


def test_killed_target_audit_resumes_to_the_uninterrupted_result(data):
    "An audit of one encoder killed while its second reference trains ends, run again, with the uninterrupted audit's tables."
    d, npz, ref = data
    r = subprocess.run(target_cmd(d, 'target-ref'), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    proc = subprocess.Popen(target_cmd(d, 'target-kill'), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (d / 'target-kill' / 'refs' / 'e1' / 'last.pt').is_file(), proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert not is_complete(d / 'target-kill'), 'the audit finished before it was killed'
    r = subprocess.run(target_cmd(d, 'target-kill'), capture_output=True, text=True)      # the same command again
    assert r.returncode == 0 and 'complete' in r.stdout, r.stdout + r.stderr
    for f in ('audit.csv', 'calibration.csv', 'by_refs.csv'):
        pd.testing.assert_frame_equal(pd.read_csv(d / 'target-kill' / f), pd.read_csv(d / 'target-ref' / f), check_exact=True)
