"BYOL's and SimSiam's predictor: kept in their checkpoints, scored as the `predictor` variants by an SSLMem run with membership redrawn, and in its bank."
import json

import numpy as np
import pandas as pd
import torch

from memssl.bank import Bank, bank_estimates
from memssl.data import write_fake_dataset
from memssl.distributed import run_distributed
from memssl.memorization import FEATURES, PREDICTED
from memssl.models import load_encoder
from memssl.runs import RunResult


def test_a_simsiam_run_scores_what_its_loss_aligns(tmp_path):
    npz = write_fake_dataset('npz', tmp_path, n_train=150, n_test=40)
    p = dict(dataset=f'npz:{npz}', method='simsiam', n_shared=48, n_candidates=24, n_independent=24, n_extra=20, epochs=2, batch_size=16,
             n_views=4, n_pairs=2, design='redrawn', coupled=True, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10, device='cpu',
             run_dir=str(tmp_path / 'run'))
    run_distributed(p)
    r = RunResult(tmp_path / 'run')
    f = load_encoder(r.dir / 'ckpt/f/encoder.pt')
    assert f.predictor_config['kind'] == 'simsiam' and f.predictor is not None
    ck = torch.load(r.dir / 'ckpt/f/last.pt', weights_only=True)['method']          # the predictor kept is the one trained
    for k, v in f.predictor.state_dict().items(): assert torch.equal(v, ck[f'predictor.{k}']), k
    every = pd.read_csv(r.dir / 'scores_all.csv')
    assert set(every['features']) == set(FEATURES) | set(PREDICTED)
    assert {t['features'] for t in r.metrics['tests']} == set(FEATURES) | set(PREDICTED) == set(r.metrics['pointwise'])
    bank = Bank(r.dir / 'bank')
    assert bank.variants() == list(FEATURES) + list(PREDICTED)
    t, summary = bank_estimates(bank, 'predictor_norm')
    assert summary['n_pairs'] == 2 and np.isfinite(t['estimate']).any()
    a, b = bank.alignment('predictor_norm'), bank.alignment('projector_norm')
    assert np.isfinite(a).all() and not np.allclose(a, b)                          # another quantity than the projector's alignment
