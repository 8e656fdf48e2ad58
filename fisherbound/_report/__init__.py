"""The report behind ``fisherbound demo`` and ``fisherbound report``, one job per module.

- ``subjects``: a trained model seen through one adapter (NumPy, torch, JAX);
- ``settings``: the knobs of the analysis and its outcome;
- ``positions``: the counted positions of models with position axes (N, ∗S, C);
- ``analysis``: ``analyse``, the stages in order;
- ``diagonal``, ``spectrum``, ``landscape``: the numbers of each part of the
  analysis, from the library's public functions;
- ``hoststats``, ``timing``: host statistics, wall-clock timing, progress bars;
- ``figures``: the PNG figures;
- ``sections``: the numbers as titled sections of paragraphs, tables, figures;
- ``render``: report.json, report.md and index.html.

The public names are re-exported by ``fisherbound.report``.
"""
