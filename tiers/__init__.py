"""offload.tiers: placement of weights and KV across GPU, host memory and disk."""
