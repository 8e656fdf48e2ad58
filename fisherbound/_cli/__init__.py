"""The command line behind ``fisherbound.cli``, one job per module.

- ``usage``: bad input on the command line (``UsageError``), argument types;
- ``parser``: the argument parser of ``fisherbound demo`` and ``fisherbound report``;
- ``commands``: running a command (thread limits, the demo, the report);
- ``trainers``: the demo's MLP in NumPy, torch or JAX and its training;
- ``loading``: the user's model and data for ``fisherbound report``, and their checks.

The names are re-exported by ``fisherbound.cli``.
"""
