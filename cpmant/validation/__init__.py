"""Inference validation: held-out quality, smoke generations, speed, latency and peak memory of one model."""
