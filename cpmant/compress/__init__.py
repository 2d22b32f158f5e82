"""Compression: structured pruning, distillation, int8 quantization and MoEfication, combined by recipes."""
