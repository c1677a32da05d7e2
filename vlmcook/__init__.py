"""vlmcook: MiniCPM-V 4.5 in plain PyTorch: model, inputs, inference and the training recipe."""

from vlmcook.config import LLMConfig, MiniCPMVConfig, ResamplerConfig, VisionConfig

__version__ = "0.1.0"
__all__ = ["LLMConfig", "MiniCPMVConfig", "ResamplerConfig", "VisionConfig"]
