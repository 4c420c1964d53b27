"""Git's clean filter for notebooks: the notebook as `nbdev_clean` leaves it, without outputs (stdin -> stdout).

`make install` registers it (`git config filter.phi4-nb.clean ...`; `.gitattributes` applies it to notebooks), so
opening, running and saving a notebook in JupyterLab changes nothing git sees: outputs, execution counts and the
metadata the front end adds stay in the working copy only."""
import json, sys
from execnb.nbio import dict2nb, nb2str
from nbdev.clean import clean_nb
from nbdev.config import get_config

nb = json.loads(sys.stdin.read())
for c in nb.get('cells', []):
    if c.get('cell_type') == 'code': c['outputs'], c['execution_count'] = [], None
    if c.get('metadata', {}).get('tags') == []: del c['metadata']['tags']     # the tag editor leaves an empty list
cfg = get_config()
clean_nb(nb, False, cfg.get('allowed_metadata_keys', '').split(), cfg.get('allowed_cell_metadata_keys', '').split(),
         cfg.get('clean_ids', True))
sys.stdout.write(nb2str(dict2nb(nb)))
