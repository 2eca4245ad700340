"""Liveness of a running job: heartbeats through the c10d store (heartbeat.py) and straggler detection
(straggler.py). Exit statuses: tessera.exitcodes."""
