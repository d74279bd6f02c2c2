"""offload.profiles: bandwidth profiles, decode-step breakdowns and benchmarks."""
