"""Each committed notebook colabs/<name>.ipynb is its jupytext source colabs/<name>.py,
converted: contributors and linters read the .py, Colab opens the .ipynb from GitHub."""
import glob
import os

import jupytext
import nbformat
import pytest

from tests import runs

COLABS = os.path.join(runs.REPO, 'colabs')
SOURCES = sorted(glob.glob(os.path.join(COLABS, '*.py')))
REGENERATE = 'run `jupytext --update --to ipynb colabs/*.py` after editing the .py'


def committed_notebook(source: str):
  return nbformat.read(os.path.splitext(source)[0] + '.ipynb', as_version=4)


def cells(notebook) -> list:
  """Each cell's type, source and tags: the `parameters` tag is where papermill and
  tests/test_colabs.py inject their values."""
  return [(cell.cell_type, cell.source, cell.metadata.get('tags', []))
          for cell in notebook.cells]


def colab_metadata(notebook) -> dict:
  """The notebook's metadata but jupytext's own, which differs between .py and .ipynb."""
  return {key: value for key, value in notebook.metadata.items() if key != 'jupytext'}


def test_every_notebook_has_a_source():
  notebooks = glob.glob(os.path.join(COLABS, '*.ipynb'))
  assert SOURCES
  assert ({os.path.splitext(path)[0] for path in notebooks}
          == {os.path.splitext(path)[0] for path in SOURCES})


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_notebook_is_its_source(source):
  notebook, text = committed_notebook(source), jupytext.read(source)
  assert cells(notebook) == cells(text), REGENERATE
  assert colab_metadata(notebook) == colab_metadata(text), REGENERATE


@pytest.mark.parametrize('source', SOURCES, ids=os.path.basename)
def test_notebook_is_committed_without_outputs(source):
  """Outputs saved from a run would open in Colab as if they came from this code."""
  for cell in committed_notebook(source).cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          'clear the outputs, then ' + REGENERATE)
