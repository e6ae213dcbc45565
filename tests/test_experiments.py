"Papermill runs of experiments/sslmem.ipynb: parameters as documented, split files honoured, failures fast and never complete-looking."
import json, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest

from memssl.data import write_fake_dataset, load_dataset
from memssl.grid import execute_run
from memssl.params import DEFAULTS, validate_params
from memssl.rundir import is_complete
from memssl.runs import RunResult
from memssl.splits import random_split, ROLES

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / 'experiments' / 'sslmem.ipynb'
TINY = dict(epochs=2, batch_size=32, n_views=4, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10,
            device='cpu', parallel=False)


def error_outputs(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']


from memssl.io import experiment_kinds


@pytest.mark.parametrize('kind', list(experiment_kinds()))
def test_parameters_cell_matches_defaults(kind):
    "Every experiment kind's notebook documents exactly the library's parameters of that kind, with the same defaults."
    from papermill.inspection import inspect_notebook
    k = experiment_kinds()[kind]
    params = inspect_notebook(str(NB.parent / k.notebook))
    assert list(params) == list(k.defaults)
    for name, v in params.items():
        assert eval(v['default']) == k.defaults[name], name
        assert v['help'], f'parameter {name} of {kind} has no comment'


def test_split_file_and_npz_score_exactly_the_manifest(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=150, n_test=40)
    data = load_dataset(f'npz:{npz}')
    s = random_split(len(data), 50, 25, 25, 20, seed=7, dataset=data.name, fingerprint=data.fingerprint)
    s.save(tmp_path / 'split.json')
    p = validate_params(dict(TINY, dataset=f'npz:{npz}', split_file=str(tmp_path / 'split.json'), run_dir=str(tmp_path / 'run')))
    assert execute_run(NB, p, echo=False) == 'complete'
    r = RunResult(tmp_path / 'run')
    for role in ROLES:
        assert sorted(r.scores.loc[r.scores.split == role, 'idx']) == s[role].tolist(), role
    assert r.split.sets['candidates'].tolist() == s['candidates'].tolist()
    assert r.meta['dataset']['fingerprint'] == data.fingerprint
    assert set(r.metrics['probes']) == {'f', 'g', 'random'}
    assert error_outputs(tmp_path / 'run' / 'report.ipynb') == []
    nb = nbformat.read(tmp_path / 'run' / 'report.ipynb', as_version=4)
    pngs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(pngs) >= 8, f'the report holds {len(pngs)} figures'
    assert json.loads((tmp_path / 'run' / 'status.json').read_text())['state'] == 'complete'


def test_split_of_another_dataset_is_refused(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=150, n_test=40)
    s = random_split(150, 50, 25, 25, 20, seed=7, dataset='other', fingerprint='0123456789abcdef')
    s.save(tmp_path / 'split.json')
    p = validate_params(dict(TINY, dataset=f'npz:{npz}', split_file=str(tmp_path / 'split.json'), run_dir=str(tmp_path / 'run')))
    assert execute_run(NB, p, echo=False) == 'failed'
    status = json.loads((tmp_path / 'run' / 'status.json').read_text())
    assert 'fingerprint' in status['error']


@pytest.mark.parametrize('bad, message', [
    (dict(n_views=1), 'n_views must be >= 2'),
    (dict(dataset='npz:/nonexistent/data.npz'), '/nonexistent/data.npz'),
    (dict(dataset='cifar10'), 'download=True'),
])
def test_failed_run_is_fast_clear_and_never_complete(tmp_path, bad, message):
    p = {**DEFAULTS, **TINY, 'data_root': str(tmp_path / 'empty'), 'run_dir': str(tmp_path / 'run'), **bad}   # not validated: as papermill would get it
    t0 = time.perf_counter()
    assert execute_run(NB, p, echo=False) == 'failed'
    assert time.perf_counter() - t0 < 120
    run = tmp_path / 'run'
    status = json.loads((run / 'status.json').read_text())
    assert status['state'] == 'failed' and message in status['error']
    assert message in (run / 'log.txt').read_text()
    assert not is_complete(run)
    for f in ('metrics.json', 'scores.csv', 'scores_all.csv'):
        assert not (run / f).exists(), f
    assert not (run / 'ckpt').exists()          # failed before any training


def test_grid_command_rejects_unknown_parameter(tmp_path):
    (tmp_path / 'g.yml').write_text(f'runs_root: {tmp_path}/runs\ngrid: {{seed: [0]}}\n')
    r = subprocess.run([str(Path(sys.executable).parent / 'memssl-grid'), str(tmp_path / 'g.yml'), '--set', 'epoch=3'], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown parameters ['epoch']" in r.stderr
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('value, message', [('fashion-mnist', "unknown dataset 'fashion-mnist'"), ('npz:no/such.npz', 'no file at')])
def test_dry_run_rejects_unknown_dataset(tmp_path, value, message):
    "A misspelt dataset or a missing data file is refused by --dry-run, before anything runs."
    (tmp_path / 'g.yml').write_text(f'runs_root: {tmp_path}/runs\ngrid: {{seed: [0]}}\n')
    r = subprocess.run([str(Path(sys.executable).parent / 'memssl-grid'), str(tmp_path / 'g.yml'), '--dry-run', '--set', f'dataset={value}'],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('grid_file', sorted(p.name for p in (ROOT / 'experiments').glob('*.yml')))
def test_every_shipped_grid_file_expands(grid_file, tmp_path, monkeypatch):
    "Every grid file in experiments/ reads and validates every run it lists; one that reads another run is refused only because that run is not made."
    from memssl.grid import load_grid
    from memssl.params import RunError
    monkeypatch.chdir(tmp_path)                                   # relative runs roots and source runs resolve in an empty directory
    try: g = load_grid(ROOT / 'experiments' / grid_file)
    except RunError as e:
        assert 'source_run' in str(e) and 'runs/' in str(e), f'{grid_file}: {e}'
        return
    assert g['runs'] and g['notebook'].is_file()
    assert len({rid for rid, _ in g['runs']}) == len(g['runs'])
