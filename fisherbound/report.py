"""The analysis behind ``fisherbound demo`` and ``fisherbound report``, and its report.

``analyse(subject, inputs, labels)`` runs every part of the library on one
trained classifier, seen through one adapter (a :class:`Subject`: NumPy
reference model, torch module or JAX function), on one batch of labelled inputs:

- the Fisher diagonal per parameter block: exact (``fisher_diagonal``), its
  deterministic bounds diag F_LR ≤ diag F ≤ diag F_DG (``fisher_bounds``) and the
  detach-and-mix estimate with its standard errors (``detach_and_mix``);
- the estimators compared on the same inputs: error against the exact diagonal
  and wall-clock cost in units of one gradient step measured in the same run;
- the core-space spectrum of the categorical (or Bernoulli) metric at every
  input: eigenvalues, the λ_max bounds, the pseudo-determinant;
- the top of the Fisher spectrum (with the bound operators' spectra beside it),
  the spectral density, the local dimension and the razor complexity;
- the loss landscape along filter-normalised random and Hessian directions:
  surfaces, projected curvature, loss-only and Hessian-vector-product traces.

Every Fisher quantity is the SUM over the analysed inputs (the papers'
convention); the landscape uses the MEAN loss. For a model whose logits have
position axes, (N, ∗S, C) (``analyse(..., mask=..., ignore_index=...)`` with
labels (N, ∗S)), the sums are also over the counted positions of each input and
the mean is over the counted positions (the per-token convention). ``write_report(analysis, out)``
writes ``report.json`` (every number), ``report.md``, ``index.html`` and the PNG
figures (matplotlib). Nothing here imports a framework or NumPy at module level.

The work is done in the private package ``fisherbound._report``, one job per
module (subjects, analysis, figures, sections, rendering); this module is its
public face.
"""

from __future__ import annotations

from typing import Any

from fisherbound._report import analysis as _analysis
from fisherbound._report import diagonal as _diagonal
from fisherbound._report import figures as _figures_module
from fisherbound._report import hoststats as _hoststats
from fisherbound._report import landscape as _landscape_module
from fisherbound._report import render as _render
from fisherbound._report import sections as _sections_module
from fisherbound._report import spectrum as _spectrum
from fisherbound._report import timing as _timing
from fisherbound._report.analysis import STAGES as STAGES
from fisherbound._report.analysis import analyse as analyse
from fisherbound._report.diagonal import MAX_JSON_PARAMS as MAX_JSON_PARAMS
from fisherbound._report.figures import FIGURES as FIGURES
from fisherbound._report.render import write_report as write_report
from fisherbound._report.sections import Block as Block
from fisherbound._report.settings import Analysis as Analysis
from fisherbound._report.settings import Settings as Settings
from fisherbound._report.subjects import Subject as Subject
from fisherbound._report.subjects import jax_subject as jax_subject
from fisherbound._report.subjects import numpy_subject as numpy_subject
from fisherbound._report.subjects import torch_subject as torch_subject

Array = Any

__all__ = [
    "Analysis",
    "Settings",
    "Subject",
    "analyse",
    "jax_subject",
    "numpy_subject",
    "torch_subject",
    "write_report",
]

# The helpers of the former single module, under their former names, for code
# that imported them from here.
_host = _hoststats.host
_stats = _hoststats.stats
_relative_error = _hoststats.relative_error
_coverage = _hoststats.coverage
_median_relative_se = _hoststats.median_relative_se
_bracket_tolerance = _hoststats.bracket_tolerance
_mean_se = _hoststats.mean_se
_wait = _timing.wait
_timed = _timing.timed
_Stages = _timing.Stages
_environment = _analysis.environment
_run = _analysis.run
_detach_and_mix = _diagonal.diagonal_estimate
_fisher_diagonal_section = _diagonal.diagonal_numbers
_compare_estimators = _diagonal.compare_estimators
_core_space = _spectrum.core_space
_top_spectrum = _spectrum.top_spectrum
_dimension = _spectrum.dimension
_curvature = _landscape_module.curvature
_surface_summary = _landscape_module.surface_summary
_landscape = _landscape_module.landscape
_figures = _figures_module.draw_figures
_EstimateView = _figures_module.EstimateView
_DensityView = _figures_module.DensityView
_SurfaceView = _figures_module.SurfaceView
_new_figure = _figures_module.new_figure
_estimators_figure = _figures_module.estimators_figure
_core_space_figure = _figures_module.core_space_figure
_spectrum_figure = _figures_module.spectrum_figure
_fmt = _sections_module.fmt
_pm = _sections_module.pm
_percent = _sections_module.percent
_sections = _sections_module.build_sections
_jsonable = _render.jsonable
_markdown = _render.markdown_page
_CSS = _render.CSS
_html = _render.html_page
_inline_code = _render.inline_code
