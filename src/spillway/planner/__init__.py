"""The private-vs-cloud planner: ROI and sizing as pure functions over editable profiles.

- :mod:`~spillway.planner.profiles`: hardware boxes, accelerators and model architectures, plus
  the ``--profiles`` TOML loader;
- :mod:`~spillway.planner.roi`: monthly cost each way, break-even month and capacity, in
  ``Decimal`` money;
- :mod:`~spillway.planner.sizing`: weights plus KV cache against accelerator memory;
- :mod:`~spillway.planner.charts`: the roi PNG (the only place a Decimal becomes a float).

It imports nothing above itself: only :mod:`spillway.prices`, :mod:`spillway.errors`, the
standard library and matplotlib. The CLI in :mod:`spillway.cli.planner_cmds` prints it.
"""
