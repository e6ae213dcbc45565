"""The README is the front door and must not rot: it stays short, it quotes no measured number (those live in the book,
computed from run files), and its journeys run verbatim.

The journeys are the bash blocks that follow a `<!-- journey: NAME -->` line. Each runs here with bash, exactly as written,
in a sandbox laid out like a fresh clone after setup (`.venv` and the experiment notebooks), on tiny data in the real
on-disk formats under `$MEMSSL_DATA`: tiny Fashion-MNIST and CIFAR-10 files, torchvision ResNet-18 checkpoints and a split
manifest with the names the README uses. The grid files keep every key of the real ones and change only the sizes (and the
seeds) so that a run takes seconds; layers.yml is the real file."""
import os, re, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from memssl.data import write_fake_dataset, load_dataset
from memssl.splits import random_split
from memssl.rundir import is_complete

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
VENV = Path(sys.executable).parent.parent

# Numbers the README may state, each a fact of the project or the paper, none a measurement. A number not listed here fails
# the test: a measured one belongs in the book (link its chapter); a structural one is added here with its reason.
ALLOWED = {
    '2024': 'the paper: ICLR 2024',
    '3.11': 'Python 3.11',
    '1': 'journey 1', '2': 'journey 2', '3': 'journey 3',
    '10': 'CIFAR-10',
    '18': 'ResNet-18',
    '600': "the paper's CIFAR-10 protocol: 600 epochs",
}


def prose(text: str) -> str:
    "The README without fenced code blocks, inline code and HTML comments (commands and paths are not quoted results)."
    text = re.sub(r'```.*?```', ' ', text, flags=re.S)
    text = re.sub(r'<!--.*?-->', ' ', text, flags=re.S)
    return re.sub(r'`[^`]*`', ' ', text)


def numbers(text: str) -> list:
    return [n.rstrip(',') for n in re.findall(r'(?<![\w.])\d[\d,]*(?:\.\d+)?%?', prose(text))]


def test_readme_is_short():
    n = len(README.splitlines())
    assert n <= 150, f'the README has {n} lines; the front door stays under 150 (details go to the book)'


def test_readme_quotes_no_measured_number():
    bad = sorted({n for n in numbers(README) if n not in ALLOWED})
    assert not bad, (f'the README quotes {bad}: measured numbers live in the book, computed from run files '
                     '(link the chapter); a structural number goes into ALLOWED in this test with its reason')


def test_the_number_check_catches_a_measurement():
    assert numbers('SSLMem ranks points at r = 0.81 (28 pairs, 19 minutes); AUROC 0.97, 48.9% above') == ['0.81', '28', '19', '0.97', '48.9%']
    assert numbers('`bash scripts/main.sh --set epochs=20`\n```bash\nx 0.5\n```\nICLR 2024') == ['2024']


def journeys() -> dict:
    found = dict(re.findall(r'<!-- journey: ([\w-]+) -->\s*```bash\n(.*?)```', README, re.S))
    assert set(found) == {'reproduce', 'gpu', 'audit-pair', 'audit-target', 'audit-one'}, sorted(found)
    return found


def tiny_grid(src: Path, dst: Path, base: dict, grid: dict | None = None, drop=()):
    "The real grid file with its base parameters overridden by `base` (and keys in `drop` removed): same kind, same keys."
    g = yaml.safe_load(src.read_text())
    g['base'] = {k: v for k, v in {**g['base'], **base}.items() if k not in drop}
    if grid is not None: g['grid'] = grid
    dst.write_text(yaml.safe_dump(g, sort_keys=False))


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
    "A fresh clone's layout after setup: .venv, the experiment notebooks and grid files (tiny), and the files the README names."
    d = tmp_path_factory.mktemp('readme')
    (d / '.venv').symlink_to(VENV)
    shutil.copytree(ROOT / 'experiments', d / 'experiments')
    data = d / 'data'
    write_fake_dataset('fashion_mnist', data, n_train=200, n_test=60)
    write_fake_dataset('cifar10', data, n_train=200, n_test=40)
    small = dict(n_shared=60, n_candidates=30, n_independent=30, n_extra=40, epochs=3, batch_size=16, n_views=4,
                 n_probe_train=100, n_probe_test=40, probe_epochs=3, knn_k=10, device='cpu')
    tiny_grid(ROOT / 'experiments' / 'default.yml', d / 'experiments' / 'default.yml', small)
    tiny_grid(ROOT / 'experiments' / 'dejavu.yml', d / 'experiments' / 'dejavu.yml', dict(k=5))     # 5 of the 40 extra points, not 100
    tiny_grid(ROOT / 'experiments' / 'cifar10_paper.yml', d / 'experiments' / 'cifar10_paper.yml',
              {**small, 'epochs': 1, 'warmup_epochs': 0, 'n_views': 2, 'max_score_per_set': 20, 'n_probe_train': 60, 'n_probe_test': 20,
               'probe_epochs': 1}, grid={'seed': [0]}, drop=('split_preset',))
    # journey 2's files: two torchvision ResNet-18 state dicts (different weights) and the split they were "trained" on
    for name, seed in (('f.pt', 0), ('g.pt', 1)):
        torch.manual_seed(seed); torch.save(torchvision.models.resnet18(weights=None).state_dict(), d / name)
    torch.manual_seed(2); torch.save(torchvision.models.resnet18(weights=None).state_dict(), d / 'encoder.pt')
    c10 = load_dataset('cifar10', data, 'train', verify=False)
    random_split(len(c10), 40, 20, 20, 20, seed=0, dataset=c10.name, fingerprint=c10.fingerprint).save(d / 'split.json')
    return d


def run_journey(sandbox: Path, name: str):
    block = journeys()[name]
    r = subprocess.run(['bash', '-euo', 'pipefail', '-c', block], cwd=sandbox, capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'MEMSSL_DATA': str(sandbox / 'data'), 'OMP_NUM_THREADS': '1',
                            'MEMSSL_VERIFY_DATA': '0'})    # the tiny CIFAR-10 files are in the real format, not the official bytes
    assert r.returncode == 0, f'journey {name!r} failed:\n{block}\n' + r.stdout[-4000:] + r.stderr[-4000:]
    return r


def test_journey_reproduce_runs_verbatim(sandbox):
    run_journey(sandbox, 'reproduce')
    for rd in ('runs/fashion_mnist-simclr-small_cnn-s0', 'runs/layers/layers-fashion_mnist-simclr-small_cnn-s0',
               'runs/dejavu/dejavu-fashion_mnist-simclr-small_cnn-s0'):
        assert is_complete(sandbox / rd), rd


def test_journey_audit_target_runs_verbatim(sandbox):
    "After journey 1 (the same sandbox): the default run's f audited against reference encoders of its recipe."
    if not is_complete(sandbox / 'runs' / 'fashion_mnist-simclr-small_cnn-s0'): run_journey(sandbox, 'reproduce')
    run_journey(sandbox, 'audit-target')
    assert is_complete(sandbox / 'runs' / 'target' / 'default-f')


def test_journey_gpu_runs_verbatim_on_the_cpu(sandbox):
    run_journey(sandbox, 'gpu')
    assert is_complete(sandbox / 'runs' / 'cifar10-simclr-resnet18-s0'), sorted(p.name for p in (sandbox / 'runs').iterdir())


def test_journey_audit_pair_runs_verbatim(sandbox):
    run_journey(sandbox, 'audit-pair')
    assert is_complete(sandbox / 'runs' / 'audit' / 'my-pair')


def test_journey_audit_one_runs_verbatim(sandbox):
    run_journey(sandbox, 'audit-one')
    assert is_complete(sandbox / 'runs' / 'audit' / 'my-encoder')
