"""Adapters: one thin module per framework, each turning a model into linearizations.

Installed as ``fisherbound.adapters`` (the name ``adapters`` is never importable on
its own). Import the one you need, e.g. ``from fisherbound.adapters import torch``;
importing this package imports no framework.
"""
