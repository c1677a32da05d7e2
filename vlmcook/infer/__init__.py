"""Inference: the token-level generation engine and the Python chat API."""

from vlmcook.infer.api import ChatChunk, ChatModel, ChatResult, Timings, Usage, split_output
from vlmcook.infer.engine import Engine, Event, Generation, SamplingParams

__all__ = ["ChatChunk", "ChatModel", "ChatResult", "Engine", "Event", "Generation", "SamplingParams", "Timings",
           "Usage", "split_output"]
