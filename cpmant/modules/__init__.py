"""Model building blocks beyond the dense CPM-Ant of `cpmant.model`: int8 linears (`quant`) and MoE feed-forwards
(`moe`). `cpmant.factory.build_model` puts them into a model from its config; compression methods create them from a
dense model's weights."""
