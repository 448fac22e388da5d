"""The training engine: distributed backends, optimisers, schedule, EMA, checkpoints, spike guard, monitoring.

The trainer (`t2i_train.train`) only talks to `Backend` (see backends.py); which one runs is a config choice.
"""
