"""offload: run long-context LLMs on one GPU, or on a CPU with an NVMe drive.

Importing this package touches no GPU: devices are chosen when a model is loaded.
"""

from . import openmp  # noqa: F401  (first: before torch loads, one OpenMP runtime for torch and numba)
from .config import ModelArgs, preset, preset_names
from .engine import RequestOutput
from .engine_config import EngineConfig
from .errors import OffloadError
from .llm import LLM
from .sampling import SamplingParams

__all__ = ["EngineConfig", "LLM", "SamplingParams", "ModelArgs", "RequestOutput", "OffloadError", "preset", "preset_names"]
__version__ = "0.1.0"
