"""What a run reports (layer 3: imports only errors, registry, config, storage and metrics; never a workflow).

- `tables` — every console table and progress line (`format_table` is the one table layout they share);
- `plots`  — the PNG figures of a run (matplotlib, imported when a figure is drawn).
"""
