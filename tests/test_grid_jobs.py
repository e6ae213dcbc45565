"Grids handed to a scheduler through submitit, tested with submitit's local executor (real processes, the same job code as SLURM)."
import subprocess, sys
from pathlib import Path

from memssl.data import write_fake_dataset
from memssl.rundir import is_complete

ROOT = Path(__file__).resolve().parent.parent
GRID = Path(sys.executable).parent / 'memssl-grid'
TINY = ("n_shared: 40, n_candidates: 20, n_independent: 20, n_extra: 20, epochs: 2, batch_size: 32, n_views: 4, n_probe_train: 100, "
        "n_probe_test: 40, probe_epochs: 5, knn_k: 10, device: cpu, parallel: false")


def grid(d: Path, name: str, axis: str) -> Path:
    f = d / f'{name}.yml'
    f.write_text(f"runs_root: {d / name}\nnotebook: {ROOT / 'experiments' / 'sslmem.ipynb'}\nbase: {{{TINY}}}\ngrid: {{{axis}}}\n")
    return f


def memssl_grid(*args):
    return subprocess.run([str(GRID), *map(str, args), '--executor', 'local'], capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_two_runs_complete_as_jobs_and_a_rerun_skips_both(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=120, n_test=40)
    g = grid(tmp_path, 'two', f"dataset: ['npz:{npz}'], seed: [0, 1]")
    r = memssl_grid(g)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count('submitted as job') == 2 and 'grid done: 2 complete, 0 skipped, 0 failed' in r.stdout
    assert all(is_complete(d) for d in (tmp_path / 'two').iterdir() if d.name != '.submitit')
    assert (tmp_path / 'two' / '.submitit').is_dir()                               # submitit's job scripts and logs
    again = memssl_grid(g)
    assert again.returncode == 0 and 'submitted' not in again.stdout and 'grid done: 0 complete, 2 skipped, 0 failed' in again.stdout


def test_a_failing_job_is_reported_while_the_other_completes(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=120, n_test=40)
    (tmp_path / 'broken.npz').write_bytes(b'not a zip archive')
    g = grid(tmp_path, 'mixed', f"dataset: ['npz:{npz}', 'npz:{tmp_path / 'broken.npz'}']")
    r = memssl_grid(g)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'grid done: 1 complete, 0 skipped, 1 failed' in r.stdout
    assert 'is not a readable .npz file' in r.stdout                                   # the reason, on the console
    done = {d.name: is_complete(d) for d in (tmp_path / 'mixed').iterdir() if d.name != '.submitit'}
    assert sorted(done.values()) == [False, True]
