"The removal experiment as papermill runs it: parameters documented, bad input refused before anything runs, a finished run's files complete."
import json, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from memssl.data import write_fake_dataset
from memssl.grid import execute_run
from memssl.removal import REMOVAL_DEFAULTS, validate_removal_params
from memssl.rundir import is_complete

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / 'experiments' / 'removal.ipynb'
GRID = str(Path(sys.executable).parent / 'memssl-grid')


def tiny(npz, run_dir, **kw):
    return {**dict(dataset=f'npz:{npz}', probe_datasets=[f'npz:{npz}'], n_pool=60, n_extra=20, n_canaries=2, epochs=2, batch_size=32,
                   n_views=4, score_seeds=2, fractions=[0.25], retrain_seeds=2, n_probe_train=100, n_probe_test=40, probe_epochs=5,
                   knn_k=10, device='cpu', parallel=False, run_dir=str(run_dir)), **kw}


def test_parameters_cell_matches_defaults():
    from papermill.inspection import inspect_notebook
    params = inspect_notebook(str(NB))
    assert list(params) == list(REMOVAL_DEFAULTS)
    for k, v in params.items():
        assert eval(v['default']) == REMOVAL_DEFAULTS[k], k
        assert v['help'], f'parameter {k} has no comment'


@pytest.mark.parametrize('setting, message', [
    ('fractions=[1.5]', 'in (0, 1)'),
    ('fractions=[0]', 'in (0, 1)'),
    ('n_folds=1', 'n_folds must be >= 2'),
    ('strategies=[worst]', "strategies must be a list of 'top', 'random', 'bottom'"),
    ('probe_datasets=[mnistt]', "unknown dataset 'mnistt'"),
    ('score_seeds=0', 'score_seeds must be a positive integer'),
])
def test_dry_run_refuses_bad_removal_parameters(tmp_path, setting, message):
    (tmp_path / 'g.yml').write_text(f'experiment: removal\nruns_root: {tmp_path}/runs\nbase: {{}}\n')
    r = subprocess.run([GRID, str(tmp_path / 'g.yml'), '--dry-run', '--set', setting], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert not (tmp_path / 'runs').exists()


def test_pool_larger_than_the_data_fails_fast_and_writes_no_results(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=100, n_test=40)
    p = validate_removal_params(tiny(npz, tmp_path / 'run', n_pool=200))
    assert execute_run(NB, p, echo=False) == 'failed'
    status = json.loads((tmp_path / 'run' / 'status.json').read_text())
    assert 'train split has 100' in status['error']
    assert not is_complete(tmp_path / 'run')
    for f in ('params.json', 'sets.json', 'scores.csv', 'crossfit', 'removal'):
        assert not (tmp_path / 'run' / f).exists(), f


def test_removal_run_and_a_scores_file_of_other_data(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=200, n_test=60)
    p = validate_removal_params(tiny(npz, tmp_path / 'a'))
    assert execute_run(NB, p, echo=False) == 'complete'
    run = tmp_path / 'a'
    m = json.loads((run / 'metrics.json').read_text())
    assert {r['kind'] for r in m['canaries']} == set(REMOVAL_DEFAULTS['canary_kinds'])
    rem = pd.read_csv(run / 'removal.csv')
    assert sorted(rem['strategy'].unique()) == ['bottom', 'none', 'random', 'top'] and set(rem['seed']) == {0, 1}
    nb = nbformat.read(run / 'report.ipynb', as_version=4)
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outs if o.get('output_type') == 'error']
    assert sum('image/png' in o.get('data', {}) for o in outs) >= 8
    # the same cross-fitting scores offered to a run on other data are refused, naming the difference
    other = tmp_path / 'other'; other.mkdir()
    npz2 = write_fake_dataset('npz', other, n_train=200, n_test=60, seed=1)
    shutil.copytree(run / 'crossfit', tmp_path / 'b' / 'crossfit')
    assert execute_run(NB, validate_removal_params(tiny(npz2, tmp_path / 'b')), echo=False) == 'failed'
    err = json.loads((tmp_path / 'b' / 'status.json').read_text())['error']
    assert 'records scores of another experiment' in err and 'fingerprint' in err
    assert not is_complete(tmp_path / 'b')


def test_removal_ranked_by_an_sslmem_run_trains_nothing_to_score_and_refuses_other_data(tmp_path):
    "source_run: the pool is the SSLMem run's candidates and independent points, ranked by their estimates over its (redrawn) pairs."
    from memssl.pointwise import pool_estimates
    from memssl.params import validate_params
    from memssl.runs import RunResult
    npz = write_fake_dataset('npz', tmp_path, n_train=160, n_test=40)
    sp = validate_params(dict(dataset=f'npz:{npz}', n_shared=40, n_candidates=30, n_independent=30, n_extra=30, n_pairs=2, epochs=2,
                              batch_size=32, n_views=4, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10, device='cpu',
                              parallel=False, run_dir=str(tmp_path / 'src')))
    assert sp['design'] == 'redrawn'
    assert execute_run(ROOT / 'experiments' / 'sslmem.ipynb', sp, echo=False) == 'complete'
    src = RunResult(tmp_path / 'src')
    with pytest.raises(ValueError, match='set n_canaries: 0'):
        validate_removal_params(tiny(npz, tmp_path / 'x', source_run=str(src.dir)))
    with pytest.raises(ValueError, match='not a complete run'):
        validate_removal_params(tiny(npz, tmp_path / 'x', source_run=str(tmp_path / 'none'), n_canaries=0))
    p = validate_removal_params(tiny(npz, tmp_path / 'rem', source_run=str(src.dir), n_canaries=0, retrain_seeds=1))
    assert execute_run(NB, p, echo=False) == 'complete'
    sets = json.loads((tmp_path / 'rem' / 'sets.json').read_text())
    assert sorted(sets['pool']) == sorted(src.split['candidates'].tolist() + src.split['independent'].tolist())
    assert sets['shared'] == src.split['shared'].tolist() and sets['extra'] == src.split['extra'].tolist()
    assert not (tmp_path / 'rem' / 'crossfit').exists()                          # nothing trained to score
    sc = pd.read_csv(tmp_path / 'rem' / 'scores.csv')
    got = sc[(sc.features == 'projector_norm') & (sc.role == 'pool')].set_index('idx')['sslmem'].sort_index()
    want = pool_estimates(pd.read_csv(src.dir / 'scores_pairs.csv'), 'projector_norm').set_index('idx')['estimate'].sort_index()
    pd.testing.assert_series_equal(got, want, check_names=False, rtol=1e-6)
    rem = pd.read_csv(tmp_path / 'rem' / 'removal.csv')
    assert set(rem['strategy']) == {'none', 'top', 'random', 'bottom'}
    npz2 = write_fake_dataset('npz', tmp_path / 'other', n_train=160, n_test=40, seed=1)
    p2 = validate_removal_params(tiny(npz2, tmp_path / 'rem2', source_run=str(src.dir), n_canaries=0))
    assert execute_run(NB, p2, echo=False) == 'failed'
    assert 'made on other data' in json.loads((tmp_path / 'rem2' / 'status.json').read_text())['error']
