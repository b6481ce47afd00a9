"""Which positions get explained (policy), and the worker that explains them in batches."""
