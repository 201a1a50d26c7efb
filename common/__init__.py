"""What every stage shares: user errors and their one-line exit, atomic writes, exit statuses.

The bottom package: `data_prep`, `train`, `ensemble` and `scripts` import it; it imports
none of them.
"""
