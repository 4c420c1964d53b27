"""The documentation site: built offline from a lesson and the `tiny` reports, then opened in headless Chromium, where
the AMC figure must have loaded.

Run: pytest tests/test_docs.py   (the browser part needs Debian's `chromium`; `.ci/run` installs it)
"""
import shutil
import pytest
from phi4_nb import reproduce as R

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync']

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp('docs')
    R.reproduce('tiny', reports=['fig01_amc', 'tab05_mixture'], root=root/'artifacts', reports_root=root/'reports')
    return R.build_docs('tiny', out=root/'site', lessons=['09_text'], reports_root=root/'reports')

def test_the_site_has_the_lesson_the_reports_and_the_kernels(site):
    for page in ('index.html', 'lessons/09_text/index.html', 'reports/index.html', 'reports/fig01_amc/index.html',
                 'kernels/index.html'):
        assert (site/page).stat().st_size > 0, page
    lesson = (site/'lessons/09_text/index.html').read_text()
    assert 'canonical' in lesson and 'default_exp' not in lesson and 'nbdev_export' not in lesson   # hidden cells gone
    assert (site/'reports/fig01_amc.png').exists()

def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='phi4_reproduce --preset'): R.build_docs('tiny', reports_root=tmp_path)

@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")
def test_a_report_page_shows_its_figure_in_chromium(site, tmp_path):
    sync_api = pytest.importorskip('playwright.sync_api')
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport=dict(width=1280, height=1600))
        page.goto((site/'reports/fig01_amc/index.html').as_uri())
        assert 'Figure 1' in page.title() + page.inner_text('h1')
        widths = page.eval_on_selector_all('img', 'els => els.map(e => e.complete ? e.naturalWidth : 0)')
        assert widths and max(widths) > 300, widths                   # the figure, decoded, not a broken image
        page.screenshot(path=str(tmp_path/'fig01_amc.png'), full_page=True)
        browser.close()
    assert (tmp_path/'fig01_amc.png').stat().st_size > 10_000
