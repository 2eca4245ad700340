"""Training jobs run by `tessera run`: a typed config (config.py) and the training loop (train.py)."""
