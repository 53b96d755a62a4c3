"""accelcore: a fast LLM inference engine with a C++ runtime.

    from accelcore import Engine, SamplingParams
    engine = Engine("path/to/hf-dir")
    outs = engine.generate(["Once upon a time"], SamplingParams(max_tokens=64, temperature=0.0))
"""

from accelcore._core import AccelcoreError, SamplingParams, cpu_isa, cuda_available, cuda_compiled, version
from accelcore.engine import CompletionOutput, Engine, RequestOutput, StreamOutput

__version__ = version()

__all__ = [
    "AccelcoreError",
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "StreamOutput",
    "cpu_isa",
    "cuda_available",
    "cuda_compiled",
]
