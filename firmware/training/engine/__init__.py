"""The numpy training engine: arena, fp32 kernels, and the trainer (QAS + SGD)."""
