"""Training jobs run by `tessera run`: the typed config (config.py), what is trained (build.py, data_sources.py),
the LR schedule (schedule.py), the loop on each rank (loop.py) and the start of the ranks (launch.py)."""
