"""The demo notebooks (notebooks/): stored without outputs, paired with their jupytext
percent scripts, and runnable top to bottom at SIZE='tiny' (executed with nbclient)."""
import glob
import json
import os
import sys

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from launch import notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, 'notebooks', '*.ipynb')))
KERNEL = 'recursive-lm-test'


def _sources(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_failures_are_one_clear_line(tmp_path):
  missing = str(tmp_path / 'scores.csv')
  with pytest.raises(notebook.NotebookError, match='Missing file: CSV_PATH') as e:
    notebook.require_file(missing, 'CSV_PATH')
  assert e.value._render_traceback_() == [f"NotebookError: Missing file: CSV_PATH {missing!r} "
                                          'does not exist.']
  with pytest.raises(notebook.NotebookError, match=r"no column\(s\) \['label'\]"):
    notebook.require_columns(['score', 'label', ''], ['score', 'id'], missing)


def test_notebooks_exist():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {'mor_quickstart.ipynb', 'relaxed_recursive.ipynb', 'ppi.ipynb', 'block_transformer.ipynb',
          'rl_clarify.ipynb'} <= names


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_stored_clean_and_paired(path):
  nb = nbformat.read(path, as_version=4)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          f'{path} cell {i} has outputs: clear them before committing.')
  paired = jupytext.read(path[:-len('.ipynb')] + '.py')
  assert _sources(paired) == _sources(nb), (
      f'{path} and its .py differ: run `jupytext --sync {path}`.')
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1 and 'SIZE' in tagged[0].source


@pytest.fixture(scope='module')
def kernel_env(tmp_path_factory, monkeypatch_module):
  """A kernel spec running this interpreter's ipykernel (no user-level install), found via
  JUPYTER_PATH; the kernel inherits the test's environment (fake CPU devices, cache)."""
  share = tmp_path_factory.mktemp('jupyter')
  spec_dir = share / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': KERNEL, 'language': 'python'}))
  monkeypatch_module.setenv('JUPYTER_PATH', str(share))
  monkeypatch_module.setenv(notebook.SIZE_ENV, 'tiny')
  monkeypatch_module.setenv('PYTHONPATH', os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))


@pytest.fixture(scope='module')
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_runs_at_tiny_size(path, kernel_env, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name=KERNEL,
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
