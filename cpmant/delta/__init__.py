"""Delta tuning: OpenDelta methods on our own `CPMAnt`, delta-only checkpoints that name their base."""
