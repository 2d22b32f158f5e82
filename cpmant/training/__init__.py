"""Pretraining: config, data (packing, the two CPM-Ant objectives), schedules and the training loop."""
