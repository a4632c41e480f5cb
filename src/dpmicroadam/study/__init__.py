"""Studies: resumable sweeps of runs (``sweep``) and their tables (``report``)."""

from dpmicroadam.study.sweep import load_sweep, read_rows, run_sweep, sweep_command

__all__ = ["load_sweep", "read_rows", "run_sweep", "sweep_command"]
