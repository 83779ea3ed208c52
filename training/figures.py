"""Figures of the reproduction jobs: matplotlib without a display, written through
``etils.epath`` (local or remote workdirs)."""


def pyplot():
  """``matplotlib.pyplot`` on the Agg backend (no display), imported on first use."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save(fig, path, dpi: int = 110) -> None:
  """Lays ``fig`` out, writes it as a PNG to ``path`` (an ``epath.Path``) and closes it."""
  plt = pyplot()
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, dpi=dpi)
  plt.close(fig)
