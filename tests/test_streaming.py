"""Data that need not fit in memory: an image folder with more bytes of pixels than a set cap streams from disk, no read
holds more than the cap, and the run gives exactly the scores, probes and training of the same folder held in memory."""
import json, os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import memssl.data as md
from memssl.data import write_fake_dataset
from memssl.distributed import run_distributed
from memssl.runs import RunResult

N_TRAIN, N_TEST = 1100, 200
BYTES_PER_IMAGE = 3 * 16 * 16                                   # the fake folder format: 16x16 RGB
CAP = 400_000                                                   # the memory cap: 520 images, under half the training split
PARAMS = dict(n_shared=200, n_candidates=100, n_independent=100, n_extra=100, epochs=3, batch_size=32, n_views=4,
              n_probe_train=400, n_probe_test=200, probe_epochs=5, knn_k=10, device='cpu', seed=1)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp('stream')
    return d, write_fake_dataset('folder', d, n_train=N_TRAIN, n_test=N_TEST)


def run(d: Path, folder: Path, name: str, cap: int | None, monkeypatch) -> tuple:
    "A whole SSLMem run in this process; returns its run directory and the size of every read of image files."
    log = d / f'{name}.reads'
    read = md.FolderSource.read
    def logged(self, pos):                                      # DataLoader workers are forked: they log to the file too
        with open(log, 'a') as f: f.write(f'{len(pos)}\n')
        return read(self, pos)
    monkeypatch.setattr(md.FolderSource, 'read', logged)
    monkeypatch.setenv('MEMSSL_DATA', str(d / 'data_root'))      # where the fingerprint of a streamed folder is remembered
    if cap is None: monkeypatch.delenv('MEMSSL_STREAM_BYTES', raising=False)
    else: monkeypatch.setenv('MEMSSL_STREAM_BYTES', str(cap))
    monkeypatch.setenv('MEMSSL_WORKERS', '2')                   # streamed batches read by 2 forked DataLoader workers
    torch.set_num_threads(1)
    run_distributed({**PARAMS, 'dataset': f'folder:{folder}', 'run_dir': str(d / name)})
    return d / name, [int(x) for x in log.read_text().split()] if log.exists() else []


def test_streamed_folder_gives_the_in_memory_results_and_never_reads_more_than_the_cap(folder, monkeypatch):
    d, f = folder
    assert N_TRAIN * BYTES_PER_IMAGE > 2 * CAP                  # the training split is more than twice the cap
    mem_dir, mem_reads = run(d, f, 'in_memory', None, monkeypatch)
    str_dir, str_reads = run(d, f, 'streamed', CAP, monkeypatch)
    pm, ps = (json.loads((r / 'params.json').read_text())['dataset'] for r in (mem_dir, str_dir))
    assert pm['streamed'] is False and ps['streamed'] is True
    assert pm['fingerprint'] == ps['fingerprint']
    assert mem_reads == [N_TRAIN, N_TEST]                        # in memory: each split read whole, once
    assert max(str_reads) * BYTES_PER_IMAGE <= CAP, max(str_reads)   # streamed: every read under the cap
    assert sum(str_reads) > 3 * N_TRAIN                           # ... and the images were read many times (epochs, scoring, probes)
    a, b = RunResult(mem_dir), RunResult(str_dir)
    pd.testing.assert_frame_equal(a.scores, b.scores, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(mem_dir / 'scores_all.csv'), pd.read_csv(str_dir / 'scores_all.csv'), check_exact=True)
    def drop(m):                                                 # timings differ; streamed runs skip the pixel-neighbour check (documented)
        m = {k: v for k, v in m.items() if k != 'timings'}
        m['pointwise'] = {v: {k: x for k, x in d.items() if k != 'neighbourhood'} for v, d in m.get('pointwise', {}).items()}
        return m
    assert 'neighbourhood' not in str(b.metrics.get('pointwise', {}))   # the streamed run: no neighbours.csv
    assert drop(a.metrics) == drop(b.metrics)                    # tests between sets, probes, training histories
    for role in ('f', 'g'):
        wa = torch.load(mem_dir / 'ckpt' / role / 'encoder.pt', weights_only=True)['state_dict']
        wb = torch.load(str_dir / 'ckpt' / role / 'encoder.pt', weights_only=True)['state_dict']
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
