"""Model definitions. Model code never mentions sharding; each model's parallelize.py applies it."""
