"""Plots for the pages the project writes (the run report, the statistics
page): matplotlib figures rendered as inline SVG, the same look and the
same SVG clean-up for every plot."""

import io
import re

ACCENT, MUTED, WARN = '#3b82c4', '#9aa5b1', '#b26a00'


def figure(width: float = 4.4, height: float = 3.3):
  """(figure, axes) with the pages' grid and spines."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  ax = fig.add_subplot()
  ax.spines[['top', 'right']].set_visible(False)
  ax.grid(True, color='#e4e7eb', linewidth=0.6)
  ax.set_axisbelow(True)
  return fig, ax


def svg_of(fig, name: str, css_class: str = 'plot') -> str:
  """The figure as inline SVG for an HTML page: no XML prologue, no
  metadata, no namespace URLs (HTML does not need them), element ids
  prefixed with `name` so that several plots on a page never share one."""
  import matplotlib
  buffer = io.StringIO()
  with matplotlib.rc_context({'svg.hashsalt': 'mlpipe', 'svg.fonttype':
                              'none', 'font.size': 9}):
    fig.tight_layout()
    fig.savefig(buffer, format='svg', metadata={'Date': None,
                                                'Creator': None})
  text = buffer.getvalue()
  text = text[text.index('<svg'):]
  text = re.sub(r'<metadata>.*?</metadata>', '', text, flags=re.S)
  text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', '', text)
  text = text.replace('xlink:href=', 'href=')
  ids = re.findall(r'\bid="([^"]+)"', text)
  for old in sorted(set(ids), key=len, reverse=True):
    new = f'{name}-{old}'
    text = (text.replace(f'id="{old}"', f'id="{new}"')
            .replace(f'url(#{old})', f'url(#{new})')
            .replace(f'href="#{old}"', f'href="#{new}"'))
  text = re.sub(r'<svg ', f'<svg class="{css_class}" role="img" '
                f'aria-label="{name}" ', text, count=1)
  return text
