"""Pretraining: config, data (packing, the two CPM-Ant objectives), schedules, run folders (runs), checkpoint state
(state), evaluation (evaluate), the allocator setting and the training loop (loop)."""
