"The book: built from a small run in a copy of the repository, then rendered in headless Chromium."
import re, shutil, subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memssl.book import build_book
from memssl.data import write_fake_dataset
from memssl.grid import execute_run
from memssl.params import validate_params
from memssl.removal import validate_removal_params
from memssl.layers import validate_layers_params

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def repo_copy(dst: Path) -> Path:
    "Tracked and untracked-but-not-ignored files of the checkout (what a fresh clone plus local edits holds)."
    files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split('\n')
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def chromium(*args, profile: Path):
    "Headless Chromium with no network at all (every host name fails to resolve): the book must work offline."
    assert CHROMIUM, 'chromium is not installed: scripts/setup.sh installs it (apt-get install chromium)'
    return subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                           '--disable-background-networking', '--disable-component-update', '--disable-sync',
                           '--host-resolver-rules=MAP * ~NOTFOUND', f'--user-data-dir={profile}',
                           '--virtual-time-budget=8000', *args], capture_output=True, text=True, timeout=120)


def screenshot(html: Path, png: Path):
    chromium('--window-size=1280,1800', f'--screenshot={png}', html.as_uri(), profile=png.parent / ('profile-' + png.stem))
    assert png.is_file(), f'chromium wrote no screenshot of {html}'
    return np.asarray(Image.open(png).convert('L'), dtype=float)


def real_figure(path: Path) -> bool:
    im = np.asarray(Image.open(path).convert('L'), dtype=float)
    return min(im.shape) >= 80 and max(im.shape) >= 300 and im.std() > 5


@pytest.fixture(scope='module')
def book(tmp_path_factory):
    root = repo_copy(tmp_path_factory.mktemp('repo'))
    npz = write_fake_dataset('npz', root / 'data', n_train=150, n_test=40)
    p = validate_params(dict(dataset=f'npz:{npz}', n_shared=50, n_candidates=25, n_independent=25, n_extra=25, epochs=2,
                             batch_size=32, n_views=4, n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10,
                             n_pairs=2, coupled=True, canaries=1, canary_kinds=['noise', 'stripes'],   # as the default run: redrawn pairs, canaries
                             device='cpu', parallel=False, run_dir=str(root / 'runs' / 'tiny')))
    assert execute_run(root / 'experiments' / 'sslmem.ipynb', p, echo=False) == 'complete'
    q = validate_removal_params(dict(dataset=f'npz:{npz}', probe_datasets=[f'npz:{npz}'], n_pool=60, n_extra=20, n_canaries=2,
                                     epochs=2, batch_size=32, n_views=4, score_seeds=2, fractions=[0.25], retrain_seeds=2,
                                     n_probe_train=100, n_probe_test=40, probe_epochs=5, knn_k=10, device='cpu', parallel=False,
                                     run_dir=str(root / 'runs' / 'removal' / 'tiny')))
    assert execute_run(root / 'experiments' / 'removal.ipynb', q, echo=False) == 'complete'
    lp = validate_layers_params(dict(source_run=str(root / 'runs' / 'tiny'), n_views=4, unit_views=3, device='cpu',
                                     run_dir=str(root / 'runs' / 'layers' / 'tiny')))
    assert execute_run(root / 'experiments' / 'layers.ipynb', lp, echo=False) == 'complete'
    from memssl.compare import validate_dejavu_params, validate_labelmem_params
    dp = validate_dejavu_params(dict(source_run=str(root / 'runs' / 'tiny'), k=5, device='cpu', run_dir=str(root / 'runs' / 'dejavu' / 'tiny')))
    assert execute_run(root / 'experiments' / 'dejavu.ipynb', dp, echo=False) == 'complete'
    lm = validate_labelmem_params(dict(source_run=str(root / 'runs' / 'tiny'), n_models=4, epochs=1, batch_size=32, device='cpu',
                                       run_dir=str(root / 'runs' / 'labelmem' / 'tiny')))
    assert execute_run(root / 'experiments' / 'labelmem.ipynb', lm, echo=False) == 'complete'
    from memssl.target import validate_target_params
    tg = validate_target_params(dict(source_run=str(root / 'runs' / 'tiny'), n_refs=2, n_views=4, n_population=40, fprs=[0.1, 0.01],
                                     device='cpu', parallel=False, run_dir=str(root / 'runs' / 'target' / 'tiny')))
    assert execute_run(root / 'experiments' / 'target.ipynb', tg, echo=False) == 'complete'
    html = build_book(root, strict=True)          # raises on any Sphinx warning or notebook error
    return root, html


PAGES = ['intro.html', 'book/results.html', 'book/methods.html', 'book/calibration.html', 'runs/tiny/report.html', 'book/generalisation.html',
         'book/layers.html', 'runs/layers/tiny/report.html', 'book/pointwise.html', 'book/library/19_layers.html',
         'book/limits.html', 'runs/dejavu/tiny/report.html', 'runs/labelmem/tiny/report.html', 'book/library/20_compare.html',
         'book/claims.html', 'runs/removal/tiny/report.html', 'book/library/13_crossfit.html', 'book/library/14_removal.html',
         'book/library/08_memorization.html', 'book/library/00_data.html', 'book/library/03_augment.html',
         'book/guide.html', 'book/glossary.html', 'runs/target/tiny/report.html', 'book/library/23_target.html', 'book/target.html']


@pytest.mark.parametrize('page', PAGES)
def test_page_exists_without_errors_or_nbdev_noise(book, page):
    root, html = book
    text = (html / page).read_text()
    assert 'Traceback (most recent call last)' not in text
    assert 'output traceback' not in text and 'CellExecutionError' not in text
    assert '#| export' not in text and '#| hide' not in text


@pytest.mark.parametrize('page, min_figures', [('book/results.html', 5), ('runs/tiny/report.html', 6), ('intro.html', 2),
                                               ('book/generalisation.html', 6), ('runs/removal/tiny/report.html', 8),
                                               ('book/library/03_augment.html', 1), ('book/methods.html', 2),
                                               ('book/layers.html', 2), ('runs/layers/tiny/report.html', 2),
                                               ('runs/dejavu/tiny/report.html', 3), ('runs/labelmem/tiny/report.html', 2),
                                               ('runs/target/tiny/report.html', 3)])
def test_figures_are_real_images(book, page, min_figures):
    root, html = book
    text = (html / page).read_text()
    srcs = [s for s in re.findall(r'<img[^>]+src="([^"]+)"', text) if not s.startswith(('http', 'data:')) and 'logo' not in s]
    figs = [(html / page).parent / s for s in srcs]
    assert len(figs) >= min_figures, f'{page}: {len(figs)} images'
    for f in figs:
        assert f.is_file(), f'{page} links a missing image {f}'
        assert real_figure(f), f'{page}: {f.name} looks blank or tiny'


def test_results_page_shows_the_run(book):
    root, html = book
    text = (html / 'book/results.html').read_text()
    assert 'tiny' in text
    for t in ('C &gt; S', 'C &gt; E', 'I &lt; S', 'I &lt; E'):
        assert t in text
    # the across-runs summary is split into narrow tables, and the book's CSS lets any wide table scroll
    assert text.count('<table') >= 3
    assert '_static/memssl.css' in text and (html / '_static' / 'memssl.css').is_file()


@pytest.mark.parametrize('page', ['intro.html', 'book/results.html', 'runs/tiny/report.html'])
def test_pages_render_in_chromium(book, page, tmp_path):
    root, html = book
    shot = screenshot(html / page, tmp_path / (page.replace('/', '_') + '.png'))
    assert shot.shape[0] > 500 and shot.std() > 10, 'the rendered page is blank'
    shutil.copy(tmp_path / (page.replace('/', '_') + '.png'), root.parent / (page.replace('/', '_') + '.png'))


REMOTE_MATHJAX = re.compile(r'https?://[^\s"\'<>]*mathjax', re.I)
MATH_PAGE = 'book/library/08_memorization.html'       # the SSLMem definition: inline and display maths


def test_mathjax_is_served_from_the_book(book):
    root, html = book
    assert (html / '_static' / 'mathjax' / 'tex-chtml.js').is_file(), 'sphinx-mathjax-offline did not copy MathJax into _static'
    remote = [str(p.relative_to(html)) for p in html.rglob('*.html') if REMOTE_MATHJAX.search(p.read_text(errors='replace'))]
    assert not remote, f'pages load MathJax from the internet: {remote}'
    srcs = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', (html / MATH_PAGE).read_text())
    assert srcs and all((html / MATH_PAGE).parent.joinpath(s.split('?')[0]).resolve().is_file() for s in srcs), srcs


def test_formulas_are_typeset_offline(book, tmp_path):
    "MathJax runs in Chromium without network: the formulas become mjx-container elements, no raw TeX is left."
    root, html = book
    assert '<span class="math notranslate nohighlight">\\(' in (html / MATH_PAGE).read_text(), 'no maths on the page'
    dom = chromium('--dump-dom', (html / MATH_PAGE).as_uri(), profile=tmp_path / 'profile').stdout
    assert dom.count('<mjx-container') >= 3, 'MathJax did not typeset the formulas'
    assert 'display="true"' in dom, 'the display formulas were not typeset'
    assert not re.search(r'nohighlight">\s*\\[(\[]', dom), 'raw TeX left on the page'


def test_claims_page_reads_the_runs(book):
    "A scoreboard (one row per claim: verdict, deciding number, small figure), then a runs table per claim, all read from the runs."
    root, html = book
    text = (html / 'book/claims.html').read_text()
    board = re.search(r'<table class="claims-board">(.*?)</table>', text, re.S)
    assert board, 'no scoreboard'
    rows = re.findall(r'<tr><td>(\d)</td>(.*?)</tr>', board.group(1), re.S)
    assert [n for n, _ in rows] == list('1234567'), rows
    for n, row in rows:
        assert re.search(r'class="claim-verdict"[^>]*>(agrees|partly|not at this scale|disagrees|not measured)<', row), n
    assert all('data:image/png;base64' in row for n, row in rows[:4]), 'claims 1-4 have their small figure (the tiny runs measure them)'
    assert 'tiny' in text                                   # the removal run's name, read from its files
    for claim in ('A significant fraction', 'Candidates score higher', 'The most memorised', 'Removing the most memorised',
                  'Limiting alignment', 'SSLMem differs from DejaVu'):
        assert claim in text, claim
    assert 'not available: needs &gt;= 2 retraining seeds' not in text    # two retraining seeds: the test ran
    assert 'Holm p' in text and 'detectable (points)' in text
    assert re.search(r'f alone right \d+\.\d%', text) and re.search(r'label memorisation \(\d+ classifiers', text)   # row 6, from runs
    assert text.count('class="claim-runs"') >= 6 and 'href="generalisation.html"' in text


FOLD_SCRIPT = """<script>window.addEventListener('load', () => { const t = document.querySelector('table.claims-board');
document.body.setAttribute('data-fold', JSON.stringify([Math.round(t.getBoundingClientRect().bottom), window.innerHeight])); });</script>"""


def test_claims_scoreboard_fits_above_the_fold(book, tmp_path):
    "In a 1,400 x 1,000 window the whole scoreboard is visible without scrolling."
    import json
    root, html = book
    copy = tmp_path / 'html'
    shutil.copytree(html, copy)
    page = copy / 'book' / 'claims.html'
    page.write_text(page.read_text().replace('</body>', FOLD_SCRIPT + '</body>'))
    dom = chromium('--window-size=1400,1000', '--dump-dom', page.as_uri(), profile=tmp_path / 'profile').stdout
    bottom, height = json.loads(re.search(r'data-fold="([^"]+)"', dom).group(1).replace('&quot;', '"'))
    assert bottom <= height, f'the scoreboard ends at {bottom} px, below the {height} px window'


def test_methods_page_shows_every_recorded_method(book):
    "The cross-method table has a row for every run recorded under results/methods, with the four tests and the probes."
    import json
    root, html = book
    text = (html / 'book/methods.html').read_text()
    recorded = sorted((ROOT / 'results' / 'methods').glob('*/params.json'))
    assert len(recorded) >= 7, 'the methods grid is not recorded'
    rows = re.findall(r'<tr>(.*?)</tr>', text, re.S)
    for f in recorded:
        p = json.loads(f.read_text())['params']
        assert any(f'>{p["method"]}<' in r and f'>{p["backbone"]}<' in r for r in rows), f'no table row for {f.parent.name}'
    import html as H
    plain = H.unescape(text)                                   # table headers may or may not have their > and < escaped
    for t in ('p(C > S)', 'p(C > E)', 'p(I < S)', 'p(I < E)', 'highly memorised C', 'kNN random', 'spread f'):
        assert t in plain, t


FIT_SCRIPT = """<script>window.addEventListener('load', () => { const bad = []; const art = document.querySelector('article');
document.querySelectorAll('article table').forEach((t, i) => { let p = t.parentElement;
  while (p && p !== art && !(p.scrollWidth > p.clientWidth + 1)) p = p.parentElement;
  if ((p && p !== art) || t.getBoundingClientRect().right > art.getBoundingClientRect().right + 1)
    bad.push([i, Math.round(t.getBoundingClientRect().width), (t.querySelector('th') || {}).textContent]); });
document.body.setAttribute('data-overflow', JSON.stringify(bad)); });</script>"""


def test_every_table_fits_a_1400_pixel_window(book, tmp_path):
    "In a 1,400-pixel browser window no table of any page is wider than the page column (none needs scrolling to show its right-hand columns)."
    import json
    root, html = book
    copy = tmp_path / 'html'
    shutil.copytree(html, copy)
    bad, checked = {}, 0
    for page in sorted(copy.rglob('*.html')):
        if '_static' in page.parts or page.name in ('genindex.html', 'search.html', 'index.html'): continue
        page.write_text(page.read_text().replace('</body>', FIT_SCRIPT + '</body>'))
        dom = chromium('--window-size=1400,1000', '--dump-dom', page.as_uri(), profile=tmp_path / 'profile').stdout
        m = re.search(r'data-overflow="([^"]*)"', dom)
        assert m, f'{page.name}: the check script did not run'
        checked += 1
        rows = json.loads(m.group(1).replace('&quot;', '"'))
        if rows: bad[str(page.relative_to(copy))] = rows
    assert checked >= 20, checked
    assert not bad, f'tables wider than the page column at 1,400 px (table number, width in px, first header): {bad}'
