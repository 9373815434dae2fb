"""One machine, many departments: baselines now, Flower simulations next."""
