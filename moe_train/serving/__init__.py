"""Making a trained MoE cheaper to serve: calibration statistics and expert pruning / merging (compress), quantized
experts (quantize). The command-line tools are moe_train.compress (moe-train-compress) and moe_train.evaluate."""
