"""The ElasticMM serving engine on JAX: instances on device subsets, driven by the `serving` policies."""

from serving.engine.engine import Engine, EngineConfig, EngineError, QueueFull
from serving.engine.request import MediaInput, RequestOutput
from serving.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineError", "MediaInput", "QueueFull", "RequestOutput", "SamplingParams"]
