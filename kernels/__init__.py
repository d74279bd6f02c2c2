"""offload.kernels: decode-attention kernels (Triton on GPU) with plain-torch references."""
