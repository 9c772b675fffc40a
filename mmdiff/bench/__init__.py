"""`mmdiff bench`: mmdiff against diffusers' PixArt at matched size (training, sampling, captioning, scaling).

`presets.py` sizes a run, `contenders.py` builds both sides, `timing.py` alternates and measures them, `flops.py`
counts model FLOPs for utilisation, `run.py` runs the sections and writes the report.
"""

from .presets import PRESETS, BenchPreset
from .run import SECTIONS, format_table, resolve_preset, run_bench

__all__ = ["PRESETS", "SECTIONS", "BenchPreset", "format_table", "resolve_preset", "run_bench"]
