"""A target encoder from another pipeline, for the recipe-mismatch experiment of `memssl-target` (book: Auditing one encoder).

It trains SimCLR the way lightly's own SimCLR example does, with lightly's parts and a plain PyTorch loop: lightly's
`SimCLRTransform` views (random resized crop from 8% of the area, horizontal flip, colour jitter with probability 0.8,
random grey, Gaussian blur with probability 0.5), `NTXentLoss` at its default temperature 0.5, SGD at a constant learning
rate of 0.06 (no momentum, no schedule), batches of 256, the last partial batch dropped. The backbone is memssl's small CNN
and the head lightly's `SimCLRProjectionHead` with memssl's default sizes, so that memssl's references of the nearest
recipe (SimCLR, small CNN; memssl's own views, Adam at 1e-3, its batches) have the target's architecture. Only what a user
of lightly must choose differs from lightly's example: the input size (28) and a one-channel normalisation (mean 0.5,
std 0.5, the one memssl's views use). Three steps, each reading a finished memssl target audit (the matched one):

    python scripts/lightly_target.py target  --audit runs/target/matched --out runs/lightly
    python scripts/lightly_target.py refs    --audit runs/target/matched --out runs/lightly --encoders 0 1
    python scripts/lightly_target.py compare --audit runs/target/matched --mismatch runs/target/lightly --out runs/lightly --dest results/target/mismatch

`target` trains on the audit's members (its `audit.csv`, role `member`) and writes `lightly_simclr.ckpt` (a
Lightning-style `{'state_dict': ...}` with `backbone.*` and `projection_head.layers.*`, as lightly's examples save),
`members.txt` and `population.txt` (that audit's, so that `memssl-target --set references=...` audits the same images with
the same memssl references), and `train.json`. `refs` trains the same pipeline on the halves the audit's reference
encoders trained on (`refs/e<k>/`). `compare` scores the lightly target and the lightly references on the audit's views and
writes the 2 x 2 table (target pipeline x reference pipeline) of AUROC and TPR at the audit's false-positive rates.
`export` saves the matched audit's own memssl target in lightly's layout and as a plain state dict, to be audited as
external encoders with the matched audit's references (their calibration must be the matched audit's).
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms.functional import to_pil_image

BATCH, LR = 256, 0.06


def train_lightly(images, epochs:int, seed:int, name:str='target'):
    "SimCLR in lightly's example loop on `images` (uint8 (N, C, H, W)): the model (backbone, projection_head), the mean loss per epoch, seconds."
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from memssl.models import build_backbone
    C, H = images.shape[1], images.shape[2]
    torch.manual_seed(seed)
    backbone = build_backbone('small_cnn', C, H)
    with torch.no_grad(): feat = backbone(torch.zeros(2, C, H, H)).flatten(1).shape[1]
    model = nn.Module(); model.backbone = backbone; model.projection_head = SimCLRProjectionHead(feat, 128, 64)
    transform = SimCLRTransform(input_size=H, normalize={'mean': [0.5] * C, 'std': [0.5] * C})
    pil = [to_pil_image(x) for x in images]

    class Views(torch.utils.data.Dataset):
        def __len__(self): return len(pil)
        def __getitem__(self, i): return transform(pil[i])

    loader = torch.utils.data.DataLoader(Views(), batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed))
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    forward = lambda x: model.projection_head(model.backbone(x).flatten(1))
    losses, t0 = [], time.time()
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for x0, x1 in loader:
            loss = criterion(forward(x0), forward(x1))
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            total += loss.item()
        losses.append(total / len(loader))
        if epoch % 20 == 0 or epoch == epochs - 1: print(f'{name}: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)', flush=True)
    return model.eval(), losses, time.time() - t0


def save_lightly(model, out:Path, info:dict):
    "The checkpoint as lightly's examples save one, written atomically, and `train.json` beside it."
    from memssl.io import atomic_write_json
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / 'lightly_simclr.ckpt.tmp'
    torch.save({'epoch': info['epochs'], 'state_dict': model.state_dict()}, tmp); tmp.replace(out / 'lightly_simclr.ckpt')
    atomic_write_json(out / 'train.json', dict(batch_size=BATCH, optimizer='sgd', lr=LR, loss='lightly NTXentLoss()',
                                               views='lightly SimCLRTransform(input_size=H, normalize mean/std 0.5)', **info))


def read_audit(audit:Path) -> tuple:
    from memssl.target import TargetResult
    r = TargetResult(audit)
    rec = r.metrics['recipe']
    if rec['backbone'] != 'small_cnn' or rec['method'] != 'simclr':
        sys.exit(f"{audit} audits a {rec['method']} {rec['backbone']} encoder; this script trains SimCLR with the small CNN")
    return r, rec['reference_epochs']


def cmd_target(a):
    from memssl.data import load_dataset
    from memssl.io import atomic_write_text
    torch.set_num_threads(a.threads)
    r, epochs = read_audit(Path(a.audit))
    tab = r.table
    members = np.sort(tab.loc[tab.role == 'member', 'idx'].to_numpy())
    population = np.sort(tab.loc[tab.role == 'population', 'idx'].to_numpy())
    train = load_dataset(r.params['dataset'], r.params.get('data_root'), 'train')
    model, losses, sec = train_lightly(train.images[members], a.epochs or epochs, a.seed)
    out = Path(a.out)
    save_lightly(model, out, dict(dataset=train.name, n_train=int(len(members)), epochs=a.epochs or epochs, seed=a.seed, seconds=round(sec, 1),
                                  losses=[round(x, 4) for x in losses]))
    atomic_write_text(out / 'members.txt', '\n'.join(map(str, members)) + '\n')
    atomic_write_text(out / 'population.txt', '\n'.join(map(str, population)) + '\n')
    print(f'wrote {out}/lightly_simclr.ckpt, members.txt ({len(members)}), population.txt ({len(population)}) in {sec:.0f} s')


def cmd_refs(a):
    from memssl.bank import Bank
    from memssl.data import load_dataset
    torch.set_num_threads(a.threads)
    r, epochs = read_audit(Path(a.audit))
    bank = Bank(Path(a.audit) / 'bank')
    train = load_dataset(r.params['dataset'], r.params.get('data_root'), 'train')
    for k in a.encoders:
        out = Path(a.out) / 'refs' / f'e{k}'
        if (out / 'lightly_simclr.ckpt').is_file(): print(f'e{k}: trained already'); continue
        idx = bank.training_indices(k)
        model, losses, sec = train_lightly(train.images[idx], a.epochs or epochs, 1000 * a.seed + k + 1, f'e{k}')
        save_lightly(model, out, dict(dataset=train.name, n_train=int(len(idx)), epochs=a.epochs or epochs, seed=1000 * a.seed + k + 1,
                                      seconds=round(sec, 1), losses=[round(x, 4) for x in losses], bank_encoder=int(k)))


def cmd_compare(a):
    from memssl.audit import load_external
    from memssl.augment import ViewConfig
    from memssl.bank import Bank
    from memssl.data import load_dataset
    from memssl.estimates import auroc, tpr_at_fpr
    from memssl.io import atomic_write_text, atomic_write_json, machine_info
    from memssl.memorization import alignment_scores
    from memssl.target import TargetResult, attack_scores, target_recipe
    audit, mis, out = Path(a.audit), Path(a.mismatch), Path(a.out)
    r, rm = TargetResult(audit), TargetResult(mis)
    p = r.params
    bank = Bank(audit / 'bank')
    if not bank.points['idx'].equals(rm.table['idx']): sys.exit(f'{mis} audited other images than {audit}')
    feat = p['features']
    if rm.params['features'] != feat: sys.exit(f"{mis} reads {rm.params['features']}, {audit} {feat}")
    vc = ViewConfig(**target_recipe(p['recipe'] or p['target'])['views'])
    train = load_dataset(p['dataset'], p.get('data_root'), 'train')
    images = train.images[bank.points['idx'].to_numpy().copy()]
    var = feat.replace('backbone', 'output')
    K = len(list((out / 'refs').glob('e*/lightly_simclr.ckpt')))             # the lightly references; memssl's first K beside them
    if K < 2: sys.exit(f'{out}/refs holds {K} lightly references; train at least a pair (refs --encoders 0 1)')
    cache = out / 'alignments.npz'
    if cache.is_file() and len(np.load(cache)['refs']) == K: L = np.load(cache)['refs']
    else:
        L = []
        for k in range(K):
            m = load_external(out / 'refs' / f'e{k}' / 'lightly_simclr.ckpt', 'lightly', 'small_cnn')
            L.append(np.asarray(alignment_scores(m, m, images, vc, n_views=p['n_views'], features=[var], seed=p['seed'], progress=True)[var][0], dtype=float))
        L = np.stack(L).astype(float)
        np.savez(cache, refs=L)
    A, M = bank.alignment(feat)[:K].astype(float), bank.membership[:K]
    t_memssl = pd.read_csv(audit / 'target.csv')[feat].to_numpy(float)
    t_lightly = pd.read_csv(mis / 'target.csv')[feat].to_numpy(float)
    member = (bank.points['role'] == 'member').to_numpy(); pop = ~member
    rows = []
    for tname, t in (('memssl', t_memssl), ('lightly', t_lightly)):
        for rname, R in (('memssl', A), ('lightly', L)):
            sc = attack_scores(t, R, M, pop, p['gamma'])
            for att, s in sc.items():
                rows.append(dict(target=tname, references=rname, matched=tname == rname, attack=att, auroc=auroc(s[member], s[pop]),
                                 **{f'tpr_at_{f:g}': tpr_at_fpr(s[member], s[pop], f) for f in p['fprs']}))
    tab = pd.DataFrame(rows)
    lv = dict(target_members={n: float(t[member].mean()) for n, t in (('memssl', t_memssl), ('lightly', t_lightly))},
              target_population={n: float(t[pop].mean()) for n, t in (('memssl', t_memssl), ('lightly', t_lightly))},
              references_own={n: float(np.mean([R[k, M[k]].mean() for k in range(len(R))])) for n, R in (('memssl', A), ('lightly', L))},
              references_other={n: float(np.mean([R[k, ~M[k]].mean() for k in range(len(R))])) for n, R in (('memssl', A), ('lightly', L))})
    dest = Path(a.dest); dest.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest / 'mismatch.csv', tab.to_csv(index=False))
    ref_sec = [json.loads((out / 'refs' / f'e{k}' / 'train.json').read_text())['seconds'] for k in range(K)]
    import subprocess
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    atomic_write_json(dest / 'RECORDED.json', dict(command=' ; '.join(a.commands) if a.commands else ' '.join(sys.argv), git_commit=commit,
                                                   recorded=time.strftime('%Y-%m-%dT%H:%M:%S'), machine=machine_info(), features=feat,
                                                   n_refs=K, n_refs_audit=int(len(bank.encoders)), n_members=int(member.sum()), n_population=int(pop.sum()),
                                                   levels=lv, lightly_target=json.loads((out / 'train.json').read_text()),
                                                   lightly_reference_seconds=ref_sec))
    print(tab.round(4).to_string(index=False)); print(json.dumps(lv, indent=1))


def cmd_export(a):
    "The matched audit's memssl target saved as lightly's examples save a model and as a plain state dict of its backbone: audited as external, they must give the memssl audit's numbers."
    from memssl.models import load_encoder
    r, _ = read_audit(Path(a.audit))
    enc = load_encoder(r.params['target'])
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    sd = {**{f'backbone.{k}': v for k, v in enc.backbone.state_dict().items()}, **{f'projection_head.{k}': v for k, v in enc.projector.state_dict().items()}}
    torch.save({'epoch': 0, 'state_dict': sd}, out / 'export_lightly.ckpt')
    torch.save(enc.backbone.state_dict(), out / 'export_state_dict.pt')
    members = np.sort(r.table.loc[r.table.role == 'member', 'idx'].to_numpy()); population = np.sort(r.table.loc[r.table.role == 'population', 'idx'].to_numpy())
    np.savetxt(out / 'members.txt', members, fmt='%d'); np.savetxt(out / 'population.txt', population, fmt='%d')
    print(f'wrote {out}/export_lightly.ckpt and export_state_dict.pt of {r.params["target"]}')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    for name in ('target', 'refs', 'compare', 'export'):
        s = sub.add_parser(name)
        s.add_argument('--audit', required=True, help="the matched memssl target audit's run directory")
        s.add_argument('--out', required=True, help="where the lightly encoders go")
        s.add_argument('--epochs', type=int, default=None, help="training epochs (default: the audit's reference epochs)")
        s.add_argument('--seed', type=int, default=0)
        if name in ('target', 'refs'): s.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads for training')
        if name == 'refs': s.add_argument('--encoders', type=int, nargs='+', required=True, help='which of the bank references to train')
        if name == 'compare':
            s.add_argument('--mismatch', required=True, help="the audit of the lightly target with the matched audit's references")
            s.add_argument('--dest', required=True, help='where the table and RECORDED.json go')
            s.add_argument('--commands', nargs='*', help='the commands of the whole experiment, recorded')
    a = ap.parse_args(argv)
    dict(target=cmd_target, refs=cmd_refs, compare=cmd_compare, export=cmd_export)[a.cmd](a)


if __name__ == '__main__':
    main()
