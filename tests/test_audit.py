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
from memssl.params import validate_params
from memssl.rundir import is_complete
from memssl.runs import RunResult
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
    assert 'f and g are swapped' in out.stdout + out.stderr, out.stdout + out.stderr
    assert not is_complete(d / 'audit-swapped')


def test_same_file_twice_is_refused_before_anything_is_written(memssl_run, tmp_path):
    d, npz, r = memssl_run
    f = r.dir / 'ckpt/f/encoder.pt'
    out = score('--f', f, '--g', f, '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'memssl', '--run-dir', tmp_path / 'x', '--dry-run')
    assert out.returncode == 2 and 'are the same file' in out.stderr
    assert not (tmp_path / 'x').exists()


def lightly_pair(d):
    "Two lightly-style Lightning checkpoints (a ResNet-18 cut at its pooling layer, lightly's SimCLR head), each trained for a step."
    for seed, name in ((0, 'f'), (1, 'g')):
        if (d / f'{name}.ckpt').exists(): continue
        torch.manual_seed(seed)
        backbone = torch.nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-1])
        head = lightly_module('lightly.models.modules').SimCLRProjectionHead(512, 512, 128)
        x = torch.randn(8, 3, 16, 16)
        loss = lightly_module('lightly.loss').NTXentLoss()(head(backbone(x).flatten(1)), head(backbone(x.flip(-1)).flatten(1)))
        opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=0.1); loss.backward(); opt.step()
        sd = {**{f'backbone.{k}': v for k, v in backbone.state_dict().items()}, **{f'projection_head.{k}': v for k, v in head.state_dict().items()}}
        torch.save({'epoch': 1, 'global_step': 1, 'state_dict': sd}, d / f'{name}.ckpt')
    return d / 'f.ckpt', d / 'g.ckpt'


def test_lightly_checkpoints_are_audited_end_to_end(memssl_run):
    "The backbone and lightly's projection head are both scored: four feature variants, the head's L2-normalised output primary."
    d, npz, r = memssl_run
    f, g = lightly_pair(d)
    out = score('--f', f, '--g', g, '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'lightly',
                '--arch', 'resnet18', '--run-dir', d / 'audit-lightly', '--set', 'device=cpu', '--set', 'n_views=4')
    assert out.returncode == 0, out.stdout + out.stderr
    a = pd.read_csv(d / 'audit-lightly' / 'scores.csv')
    assert sorted(a['idx']) == sorted(r.scores['idx']) and a['sslmem'].notna().all()
    p = json.loads((d / 'audit-lightly' / 'params.json').read_text())
    assert p['files']['f']['sha256'] != p['files']['g']['sha256'] and p['split']['hash']
    every = pd.read_csv(d / 'audit-lightly' / 'scores_all.csv')
    assert sorted(set(every['features'])) == ['output', 'output_norm', 'projector', 'projector_norm']
    assert every.groupby('features').size().nunique() == 1 and every['sslmem'].notna().all()
    m = json.loads((d / 'audit-lightly' / 'metrics.json').read_text())
    assert m['score_features'] == 'projector_norm'


@pytest.fixture(scope='module')
def grey_data(tmp_path_factory):
    "A grey npz dataset (N x H x W images) and a split manifest of it."
    import numpy as np
    from memssl.data import load_dataset
    from memssl.splits import random_split
    d = tmp_path_factory.mktemp('grey')
    rng = np.random.default_rng(0)
    np.savez(d / 'grey.npz', images=rng.integers(0, 256, (120, 16, 16), dtype=np.uint8), labels=np.arange(120) % 4,
             test_images=rng.integers(0, 256, (20, 16, 16), dtype=np.uint8), test_labels=np.arange(20) % 4)
    data = load_dataset(f"npz:{d / 'grey.npz'}")
    assert data.images.shape[1] == 1
    random_split(len(data), 40, 20, 20, 20, seed=1, dataset=data.name, fingerprint=data.fingerprint).save(d / 'split.json')
    return d, f"npz:{d / 'grey.npz'}", d / 'split.json'


IMAGENET = ['--set', 'mean=[0.485,0.456,0.406]', '--set', 'std=[0.229,0.224,0.225]']


def test_dry_run_checks_the_length_of_mean_and_std_on_grey_data(grey_data):
    "Grey data takes 1 value (grey views) or 3 (views of the image repeated to RGB, as PIL's convert('RGB') makes them); nothing else."
    d, data, split = grey_data
    f, g = lightly_pair(d)
    args = ['--f', f, '--g', g, '--split', split, '--dataset', data, '--format', 'lightly', '--arch', 'resnet18', '--run-dir', d / 'dry', '--dry-run']
    ok = score(*args, *IMAGENET)
    assert ok.returncode == 0 and 'parameters ok' in ok.stdout, ok.stdout + ok.stderr
    bad = score(*args, '--set', 'mean=[0.5,0.5]', '--set', 'std=[0.5,0.5]')
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert 'mean has 2 values' in bad.stderr and '1 or 3' in bad.stderr, bad.stderr
    assert not (d / 'dry').exists()


def test_three_channel_encoder_on_grey_data_with_imagenet_statistics(grey_data):
    "An encoder trained on RGB copies of grey images, normalised with ImageNet's statistics, is audited on those views."
    d, data, split = grey_data
    f, g = lightly_pair(d)
    out = score('--f', f, '--g', g, '--split', split, '--dataset', data, '--format', 'lightly', '--arch', 'resnet18',
                '--run-dir', d / 'audit-rgb', '--set', 'device=cpu', '--set', 'n_views=4', *IMAGENET)
    assert out.returncode == 0, out.stdout + out.stderr
    assert is_complete(d / 'audit-rgb')
    every = pd.read_csv(d / 'audit-rgb' / 'scores_all.csv')
    assert len(every) == 4 * 100 and every['sslmem'].notna().all()


def test_a_failed_audit_prints_its_reason(memssl_run, tmp_path):
    "Weights that do not fit the stated architecture: the audit fails, and the command prints why (from status.json)."
    d, npz, r = memssl_run
    for seed, name in ((0, 'f'), (1, 'g')):
        torch.manual_seed(seed); torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / f'{name}.pt')
    out = score('--f', tmp_path / 'f.pt', '--g', tmp_path / 'g.pt', '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}',
                '--format', 'torchvision', '--arch', 'resnet50', '--run-dir', tmp_path / 'audit', '--set', 'device=cpu', '--set', 'n_views=4')
    assert out.returncode == 1
    assert 'the weights do not fit the backbone' in out.stdout + out.stderr, out.stdout + out.stderr
    assert 'memssl-score: failed' in out.stdout + out.stderr


def test_several_pairs_are_audited_together_as_a_run_of_pairs_scores_them(tmp_path):
    """Two independent pairs of a memssl run given to memssl-score with the split they share (design: fixed): the per-point means,
    standard errors and q-values of the run itself. The pairs of a redrawn run do not share one split: refused, naming the training sets."""
    npz = write_fake_dataset('npz', tmp_path, n_train=150, n_test=40)
    base = dict(dataset=f'npz:{npz}', n_shared=50, n_candidates=25, n_independent=25, n_extra=25, epochs=2, batch_size=32,
                n_views=4, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10, device='cpu', parallel=False, n_pairs=2)
    for design in ('fixed', 'redrawn'):
        p = validate_params(dict(base, design=design, run_dir=str(tmp_path / f'run-{design}')))
        assert execute_run(ROOT / 'experiments' / 'sslmem.ipynb', p, echo=False) == 'complete'
    rd = RunResult(tmp_path / 'run-redrawn')
    out = score('--f', rd.dir / 'ckpt/f/encoder.pt', rd.dir / 'ckpt/pair1/f/encoder.pt', '--g', rd.dir / 'ckpt/g/encoder.pt', rd.dir / 'ckpt/pair1/g/encoder.pt',
                '--split', rd.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'memssl', '--run-dir', tmp_path / 'audit-redrawn',
                '--set', 'n_views=4', '--set', 'device=cpu')
    assert out.returncode != 0 and 'trained on another training set' in out.stdout + out.stderr, out.stdout + out.stderr
    r = RunResult(tmp_path / 'run-fixed')
    out = score('--f', r.dir / 'ckpt/f/encoder.pt', r.dir / 'ckpt/pair1/f/encoder.pt', '--g', r.dir / 'ckpt/g/encoder.pt', r.dir / 'ckpt/pair1/g/encoder.pt',
                '--split', r.dir / 'split.json', '--dataset', f'npz:{npz}', '--format', 'memssl', '--run-dir', tmp_path / 'audit',
                '--set', 'crop_scale_min=0.5', '--set', 'color_strength=0.5', '--set', 'n_views=4', '--set', 'device=cpu')
    assert out.returncode == 0, out.stdout + out.stderr
    a = pd.read_csv(tmp_path / 'audit' / 'scores.csv')
    cols = ['idx', 'split', 'sslmem', 'n_pairs', 'sslmem_se', 'p_value', 'q_value', 'memorised']
    pd.testing.assert_frame_equal(a[cols], r.scores[cols], check_exact=True)
    assert (a['n_pairs'] == 2).all() and a['sslmem_se'].notna().all()
    m = json.loads((tmp_path / 'audit' / 'metrics.json').read_text())
    pw = m['pointwise']['projector_norm']
    assert pw['n_pairs'] == 2 and 'reliability' in pw and pw['membership']['targets'] == 4
    bad = score('--f', r.dir / 'ckpt/f/encoder.pt', r.dir / 'ckpt/pair1/f/encoder.pt', '--g', r.dir / 'ckpt/g/encoder.pt', '--split', r.dir / 'split.json',
                '--dataset', f'npz:{npz}', '--format', 'memssl', '--run-dir', tmp_path / 'audit2', '--dry-run')
    assert bad.returncode == 2 and 'f_path names 2 checkpoints and g_path 1' in bad.stderr, bad.stderr


def test_unitmem_of_an_external_checkpoint_through_the_command(grey_data):
    """One torchvision ResNet-18, built, trained a step and saved here, audited with memssl-score --unitmem: against the split's
    extra set, and (a dry run) against the test split when no split is given; --g with --unitmem is refused."""
    import numpy as np
    from memssl.audit import UnitmemResult
    d, data, split = grey_data
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    x = torch.rand(8, 3, 16, 16)
    loss = net(x).pow(2).mean()                       # one step of anything: the weights are no longer their initialisation
    opt = torch.optim.SGD(net.parameters(), lr=0.1); opt.zero_grad(); loss.backward(); opt.step()
    torch.save(net.state_dict(), d / 'one.pt')
    args = ['--unitmem', '--f', d / 'one.pt', '--dataset', data, '--format', 'torchvision', '--arch', 'resnet18', *IMAGENET]
    out = score(*args, '--split', split, '--run-dir', d / 'um', '--set', 'device=cpu', '--set', 'unit_views=2')
    assert out.returncode == 0, out.stdout + out.stderr
    r = UnitmemResult(d / 'um')
    blocks = [f'module.layer{i}.{j}' for i in range(1, 5) for j in range(2)]     # the grey-to-RGB wrapper's ResNet blocks
    assert r.units['layer'].tolist() == blocks
    assert set(r.unitmem['role']) == {'candidates', 'extra'}
    assert r.unitmem.groupby('role').size().to_dict() == {'candidates': 1920, 'extra': 1920}     # two blocks of each stage: 2 x (64 + 128 + 256 + 512) units per side
    units = {'layer1': 64, 'layer2': 128, 'layer3': 256, 'layer4': 512}
    assert r.units['units'].tolist() == [units[b.split('.')[1]] for b in blocks]
    assert r.unitmem['unitmem'].between(0, 1).all()
    assert set(r.unitmem.loc[r.unitmem.role == 'candidates', 'argmax']) <= set(json.loads(Path(split).read_text())['sets']['candidates'])
    assert (r.metrics['n_members'], r.metrics['n_null']) == (20, 20)
    dry = score(*args, '--run-dir', d / 'um-dry', '--dry-run')
    assert dry.returncode == 0 and 'UnitMem of' in dry.stdout, dry.stdout + dry.stderr
    both = score(*args, '--g', d / 'one.pt', '--run-dir', d / 'um-bad')
    assert both.returncode == 2 and 'one encoder' in both.stderr, both.stdout + both.stderr
    assert not (d / 'um-bad').exists() and not (d / 'um-dry').exists()


def test_unitmem_of_a_timm_vit_reads_its_mlp_units(grey_data):
    """A timm ViT-Tiny, built for 16 px images, trained a step and saved here, audited with memssl-score --unitmem: a ViT's blocks
    write a signed residual stream, so UnitMem reads the hidden units of each block's MLP (the positive part of their GELU)."""
    import timm
    from memssl.audit import UnitmemResult
    d, data, split = grey_data
    torch.manual_seed(0)
    net = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=16, patch_size=4, num_classes=0)
    loss = net(torch.rand(8, 3, 16, 16)).pow(2).mean()
    opt = torch.optim.SGD(net.parameters(), lr=0.1); opt.zero_grad(); loss.backward(); opt.step()
    torch.save(net.state_dict(), d / 'vit.pt')
    out = score('--unitmem', '--f', d / 'vit.pt', '--dataset', data, '--format', 'timm', '--arch', 'vit_tiny_patch16_224', *IMAGENET,
                '--split', split, '--run-dir', d / 'um-vit', '--set', 'device=cpu', '--set', 'unit_views=2')
    assert out.returncode == 0, out.stdout + out.stderr
    r = UnitmemResult(d / 'um-vit')
    assert r.metrics['skipped'] == {}
    assert len(r.units) == 12 and all(l.endswith(f'blocks.{i}.mlp.act') for i, l in enumerate(r.units['layer']))
    assert r.units['units'].tolist() == [4 * 192] * 12                  # ViT-Tiny's MLP: 4 x 192 hidden units per block
    assert r.unitmem['unitmem'].between(0, 1).all() and (r.unitmem['mu_max'] >= 0).all()


def test_benchmarks_of_a_moved_run_record_what_measured_them(memssl_run, tmp_path):
    "memssl-bench reads a run where it lies now (not where params.json says it was made) and records the commit and command."
    from memssl.bench import run_benchmarks
    import shutil
    d, npz, r = memssl_run
    moved = tmp_path / 'moved'
    shutil.copytree(r.dir, moved)
    hidden = r.dir.with_name('run-hidden')
    r.dir.rename(hidden)                                   # the run's recorded run_dir no longer exists while the copy is benchmarked
    try:
        out = tmp_path / 'bench.json'
        out.write_text('{}')
        run_benchmarks(moved, out, k=2, n_score=20, n_per_image=2, var_points=8, ks=(2, 4), repeats=1, methods=('simclr',), device='cpu',
                       only=['scoring', 'variance', 'training', 'batch_scan', 'profile'], batch_sizes=(8, 16, 10_000), command='memssl-bench (test)')
    finally:
        hidden.rename(r.dir)
    b = json.loads(out.read_text())
    assert b['run'] == 'moved' and b['device'] == 'cpu' and b['command'] == 'memssl-bench (test)'
    assert b['commit'] is None or len(b['commit'].split('-')[0]) == 40
    assert [row['batch_size'] for row in b['batch_scan']] == [8, 16]          # a batch larger than the data set is skipped
    assert all(row['train_images_s'] > 0 and row['method'] == 'simclr' for row in b['batch_scan'])
    assert b['scoring']['n_points'] == 20 and [v['k'] for v in b['variance']] == [2, 4]
    assert b['profile'] and all(0 <= e['share'] <= 1 for e in b['profile']) and not any('#' in e['op'] for e in b['profile'])   # operators, no ranges
