"memssl-score: auditing an f/g pair trained elsewhere, through the real command and papermill."
import json, subprocess, sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
import torchvision

from memssl.audit import AUDIT_DEFAULTS
from memssl.data import write_fake_dataset
from memssl.grid import execute_run
from memssl.runs import validate_params, RunResult, is_complete
from memssl.models import lightly_module

ROOT = Path(__file__).resolve().parent.parent
SCORE = Path(sys.executable).parent / 'memssl-score'


def score(*args):
    return subprocess.run([str(SCORE), *map(str, args), '--quiet'], capture_output=True, text=True, cwd=ROOT)


def test_parameters_cell_matches_defaults():
    from papermill.inspection import inspect_notebook
    params = inspect_notebook(str(ROOT / 'experiments' / 'audit.ipynb'))
    assert list(params) == list(AUDIT_DEFAULTS)
    for k, v in params.items():
        assert eval(v['default']) == AUDIT_DEFAULTS[k], k
        assert v['help'], f'parameter {k} has no comment'


@pytest.fixture(scope='module')
def memssl_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('audit')
    npz = write_fake_dataset('npz', d, n_train=150, n_test=40)
    p = validate_params(dict(dataset=f'npz:{npz}', n_shared=50, n_candidates=25, n_independent=25, n_extra=25, epochs=2, batch_size=32,
                             n_views=4, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10, device='cpu', parallel=False,
                             run_dir=str(d / 'run')))
    assert execute_run(ROOT / 'experiments' / 'sslmem.ipynb', p, echo=False) == 'complete'
    return d, npz, RunResult(d / 'run')


def test_auditing_memssl_checkpoints_reproduces_the_run_exactly(memssl_run):
    "The same encoders, split, views, K and seed: memssl-score gives the run's own scores, bit for bit."
    d, npz, r = memssl_run
    out = score('--f', r.dir / 'ckpt/f/encoder.pt', '--g', r.dir / 'ckpt/g/encoder.pt', '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}',
                '--format', 'memssl', '--run-dir', d / 'audit-memssl', '--set', 'crop_scale_min=0.5', '--set', 'color_strength=0.5',
                '--set', 'n_views=4', '--set', 'device=cpu')
    assert out.returncode == 0, out.stdout + out.stderr
    a = pd.read_csv(d / 'audit-memssl' / 'scores.csv')
    cols = ['idx', 'split', 'label', 'align_f', 'align_g', 'sslmem', 'sslmem_minmax', 'sslmem_ratio', 'sslmem_centered']
    pd.testing.assert_frame_equal(a[cols], r.scores[cols], check_exact=True)
    m = json.loads((d / 'audit-memssl' / 'metrics.json').read_text())
    assert m['score_features'] == 'projector_norm' and len([t for t in m['tests'] if t['features'] == 'projector_norm']) == 4
    nb = nbformat.read(d / 'audit-memssl' / 'report.ipynb', as_version=4)
    assert not [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']


def test_swapped_memssl_checkpoints_are_refused(memssl_run):
    d, npz, r = memssl_run
    out = score('--f', r.dir / 'ckpt/g/encoder.pt', '--g', r.dir / 'ckpt/f/encoder.pt', '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}',
                '--format', 'memssl', '--run-dir', d / 'audit-swapped', '--set', 'device=cpu', '--set', 'n_views=4')
    assert out.returncode == 1
    status = json.loads((d / 'audit-swapped' / 'status.json').read_text())
    assert status['state'] == 'failed' and 'f and g are swapped' in status['error']
    assert not is_complete(d / 'audit-swapped')


def test_same_file_twice_is_refused_before_anything_is_written(memssl_run, tmp_path):
    d, npz, r = memssl_run
    f = r.dir / 'ckpt/f/encoder.pt'
    out = score('--f', f, '--g', f, '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'memssl', '--run-dir', tmp_path / 'x', '--dry-run')
    assert out.returncode == 2 and 'are the same file' in out.stderr
    assert not (tmp_path / 'x').exists()


def test_lightly_checkpoints_are_audited_end_to_end(memssl_run):
    "Two lightly-style Lightning checkpoints (a ResNet-18 cut at its pooling layer, lightly's SimCLR head), each trained for a step."
    d, npz, r = memssl_run
    for seed, name in ((0, 'f'), (1, 'g')):
        torch.manual_seed(seed)
        backbone = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
        head = lightly_module('lightly.models.modules').SimCLRProjectionHead(512, 512, 128)
        x = torch.randn(8, 3, 16, 16)
        loss = lightly_module('lightly.loss').NTXentLoss()(head(backbone(x).flatten(1)), head(backbone(x.flip(-1)).flatten(1)))
        opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1); loss.backward(); opt.step()
        sd = {**{f'backbone.{k}': v for k, v in backbone.state_dict().items()}, **{f'projection_head.{k}': v for k, v in head.state_dict().items()}}
        torch.save({'epoch': 1, 'global_step': 1, 'state_dict': sd}, d / f'{name}.ckpt')
    out = score('--f', d / 'f.ckpt', '--g', d / 'g.ckpt', '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'lightly',
                '--arch', 'resnet18', '--run-dir', d / 'audit-lightly', '--set', 'device=cpu', '--set', 'n_views=4')
    assert out.returncode == 0, out.stdout + out.stderr
    a = pd.read_csv(d / 'audit-lightly' / 'scores.csv')
    assert sorted(a['idx']) == sorted(r.scores['idx']) and a['sslmem'].notna().all()
    p = json.loads((d / 'audit-lightly' / 'params.json').read_text())
    assert p['files']['f']['sha256'] != p['files']['g']['sha256'] and p['split']['hash']
