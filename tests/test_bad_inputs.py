"""A table of bad inputs: each is refused with an error that names the problem, and leaves nothing behind.

Each case builds its input in a fresh folder, calls the entry point a user would call (a
parameter check, a loader, a split, a checkpoint, the grid command), and checks the error's
type and wording; `nothing_written` lists the paths that must not exist afterwards."""
import json, os, subprocess, sys, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memssl.data import load_dataset, write_fake_dataset
from memssl.grid import load_grid
from memssl.models import Encoder, encoder_config, load_encoder, save_encoder, CheckpointError
from memssl.params import validate_params, RunError
from memssl.runs import start_run
from memssl.splits import Split, SplitError, load_split, random_split

ROOT = Path(__file__).resolve().parent.parent


def npz(d: Path, name='data.npz', **arrays):
    base = dict(images=np.zeros((20, 8, 8), np.uint8), labels=np.arange(20) % 2)
    base.update(arrays)
    np.savez(d / name, **{k: v for k, v in base.items() if v is not None})
    return d / name


def tiny_checkpoint(d: Path, backbone='small_cnn') -> Path:
    torch.manual_seed(0)
    return save_encoder(Encoder(encoder_config(backbone, 1, 16)), d / 'enc.pt') or d / 'enc.pt'


def grid_file(d: Path, base: str) -> Path:
    (d / 'g.yml').write_text(f'runs_root: {d / "runs"}\nbase: {base}\ngrid: {{seed: [0]}}\n')
    return d / 'g.yml'


def split_of(n, **kw):
    return random_split(n, 4, 2, 2, 2, seed=0, dataset='x', fingerprint='f' * 16, **kw)


# (id, build(d) -> callable, exception type, words the message must contain, paths under d that must not exist)
CASES = [
    ('unknown dataset', lambda d: lambda: validate_params({'dataset': 'fashion-mnist', 'run_dir': str(d / 'run')}),
     RunError, "unknown dataset 'fashion-mnist'", ['run']),
    ('unknown method', lambda d: lambda: validate_params({'method': 'moco', 'run_dir': str(d / 'run')}),
     RunError, "unknown method 'moco'", ['run']),
    ('unknown backbone', lambda d: lambda: validate_params({'backbone': 'resnet101', 'run_dir': str(d / 'run')}),
     RunError, "unknown backbone 'resnet101'", ['run']),
    ('MAE on a CNN', lambda d: lambda: validate_params({'method': 'mae', 'backbone': 'resnet18', 'run_dir': str(d / 'run')}),
     RunError, "method 'mae' needs a ViT backbone", ['run']),
    ('unknown method hyper-parameter', lambda d: lambda: validate_params({'method': 'dino', 'method_params': {'temp': 0.1}}),
     RunError, "method_params ['temp'] are not hyper-parameters of 'dino'", []),
    ('unknown preset', lambda d: lambda: validate_params({'preset': 'gpu'}), RunError, "unknown preset 'gpu'", []),
    ('missing npz file', lambda d: lambda: validate_params({'dataset': f'npz:{d}/none.npz', 'run_dir': str(d / 'run')}),
     RunError, f'no file at', ['run']),
    ('truncated npz', lambda d: (lambda p: (p.write_bytes(p.read_bytes()[:200]), lambda: load_dataset(f'npz:{p}'))[1])(npz(d)),
     ValueError, 'is not a readable .npz file', []),
    ('not a zip at all', lambda d: (lambda p: (p.write_text('hello'), lambda: load_dataset(f'npz:{p}'))[1])(d / 'x.npz'),
     ValueError, 'is not a readable .npz file', []),
    ('npz images of the wrong shape', lambda d: lambda: load_dataset(f"npz:{npz(d, images=np.zeros((20, 64), np.uint8))}"),
     ValueError, 'images must be N×H×W or N×H×W×C', []),
    ('npz float images', lambda d: lambda: load_dataset(f"npz:{npz(d, images=np.zeros((20, 8, 8), np.float32))}"),
     ValueError, 'images must be uint8, got float32', []),
    ('npz images with NaNs', lambda d: lambda: load_dataset(f"npz:{npz(d, images=np.full((20, 8, 8), np.nan))}"),
     ValueError, 'images must be uint8, got float64', []),
    ('npz labels with NaNs', lambda d: lambda: load_dataset(f"npz:{npz(d, labels=np.full(20, np.nan))}"),
     ValueError, 'labels must be a 1-D integer array', []),
    ('npz negative labels', lambda d: lambda: load_dataset(f"npz:{npz(d, labels=-np.ones(20, int))}"),
     ValueError, 'labels must be >= 0', []),
    ('npz labels outside the class names', lambda d: lambda: load_dataset(f"npz:{npz(d, labels=np.arange(20), classes=np.array(['a', 'b']))}"),
     ValueError, 'labels must lie in [0, 2)', []),
    ('npz without labels', lambda d: lambda: load_dataset(f"npz:{npz(d, labels=None)}"), ValueError, "array 'labels' is missing", []),
    ('npz images and labels of different lengths', lambda d: lambda: load_dataset(f"npz:{npz(d, labels=np.zeros(7, int))}"),
     ValueError, '20 images but 7 labels', []),
    ('missing image folder', lambda d: lambda: validate_params({'dataset': f'folder:{d}/nope'}), RunError, 'no folder at', []),
    ('empty set in a split', lambda d: lambda: Split({'shared': np.arange(3), 'candidates': np.array([], int), 'independent': np.arange(3, 5),
                                                      'extra': np.array([], int)}, n_train=10), SplitError, "empty 'candidates' set", []),
    ('overlapping sets', lambda d: lambda: Split({'shared': np.arange(4), 'candidates': np.arange(3, 6), 'independent': np.arange(6, 8),
                                                  'extra': np.array([], int)}, n_train=10), SplitError, "sets 'shared' and 'candidates' overlap", []),
    ('oversized sets', lambda d: lambda: random_split(10, 8, 4, 4, 0, seed=0), SplitError, 'the split needs 16 points', []),
    ('index out of range', lambda d: lambda: Split({'shared': np.arange(4), 'candidates': np.array([4, 50]), 'independent': np.arange(6, 8),
                                                     'extra': np.array([], int)}, n_train=10), SplitError, 'out of range', []),
    ('a split for other data', lambda d: lambda: (lambda s: (s.save(d / 's.json'), load_split(d / 's.json', load_dataset(f'npz:{npz(d)}')))[1])(split_of(20)),
     SplitError, "split was made for dataset 'x'", []),
    ('a split file that is not a manifest', lambda d: (lambda p: (p.write_text('{"a": 1}'), lambda: load_split(p))[1])(d / 's.json'),
     SplitError, 'is not a memssl split manifest', []),
    ('a truncated split file', lambda d: (lambda p: (p.write_text('{"format": "memssl'), lambda: load_split(p))[1])(d / 's.json'),
     ValueError, 'is not valid JSON (corrupted or truncated?)', []),
    ('checkpoint of another architecture', lambda d: lambda: load_encoder(tiny_checkpoint(d), expect={'backbone': 'resnet18'}),
     CheckpointError, "holds a backbone='small_cnn' encoder, but backbone='resnet18' was expected", []),
    ('truncated checkpoint', lambda d: (lambda p: (p.write_bytes(p.read_bytes()[:300]), lambda: load_encoder(p))[1])(tiny_checkpoint(d)),
     CheckpointError, 'cannot be read (truncated or corrupted?)', []),
    ('pickled whole model', lambda d: (lambda p: (torch.save(Encoder(encoder_config('small_cnn', 1, 16)), p), lambda: load_encoder(p))[1])(d / 'm.pt'),
     CheckpointError, 'holds pickled Python objects', []),
    ('n_views below 2', lambda d: lambda: validate_params({'n_views': 1, 'run_dir': str(d / 'run')}), RunError, 'n_views must be >= 2', ['run']),
    ('batch size 0', lambda d: lambda: validate_params({'batch_size': 0, 'run_dir': str(d / 'run')}), RunError,
     'batch_size must be a positive integer, got 0', ['run']),
    ('epochs given as text', lambda d: lambda: validate_params({'epochs': '100'}), RunError, "epochs must be a positive integer, got '100'", []),
    ('device cuda without a GPU', lambda d: lambda: validate_params({'device': 'cuda', 'run_dir': str(d / 'run')}), RunError,
     'asked for CUDA but torch sees no GPU', ['run']),
    ('grid parameter of the wrong type', lambda d: lambda: load_grid(grid_file(d, '{epochs: ten}')), RunError,
     "epochs must be a positive integer, got 'ten'", ['runs']),
    ('grid parameter with an unknown name', lambda d: lambda: load_grid(grid_file(d, '{epoch: 3}')), RunError,
     "unknown parameters ['epoch']", ['runs']),
    ('grid file that is not YAML', lambda d: (lambda p: (p.write_text('base: {epochs: [1'), lambda: load_grid(p))[1])(d / 'g.yml'),
     ValueError, 'is not valid YAML', ['runs']),
    ('run directory of another run', lambda d: (lambda: (start_run({'run_dir': str(d / 'run'), 'epochs': 3}),
                                                         lambda: start_run({'run_dir': str(d / 'run'), 'epochs': 4}))[1])(),
     RunError, 'holds a run with other parameters (epochs: 3 there, 4 here)', []),
    ('output path blocked by a file', lambda d: (lambda: ((d / 'out').write_text('x'), lambda: start_run({'run_dir': str(d / 'out' / 'run')}))[1])(),
     OSError, 'out', ['out/run']),
]

if torch.cuda.is_available():       # on a GPU machine the CUDA case is not an error
    CASES = [c for c in CASES if c[0] != 'device cuda without a GPU']


@pytest.mark.parametrize('name, build, exc, words, absent', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(tmp_path, name, build, exc, words, absent):
    call = build(tmp_path)
    with pytest.raises(exc) as e:
        call()
    assert words in str(e.value), f'{name}: the message does not say {words!r}: {e.value}'
    for a in absent:
        assert not (tmp_path / a).exists(), f'{name}: {a} was written'


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_dry_run_rejects_bad_grid_values_before_anything_runs(tmp_path):
    "The grid command with --dry-run exits 2 on a parameter of the wrong type, and creates no run directory."
    g = grid_file(tmp_path, '{n_views: 1.5}')
    r = subprocess.run([str(Path(sys.executable).parent / 'memssl-grid'), str(g), '--dry-run'], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'n_views must be a positive integer, got 1.5' in r.stderr + r.stdout
    assert not (tmp_path / 'runs').exists()


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root writes into read-only folders; checked as a normal user only')
def test_read_only_output_directory(tmp_path):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match='ro'):
            start_run({'run_dir': str(ro / 'run')})
        assert not (ro / 'run').exists()
    finally: ro.chmod(0o755)
