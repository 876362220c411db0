"""Serving: the continuous-batching engine (engine.py) and the OpenAI-compatible HTTP server
(app.py, `vlmfast serve`)."""

from vlmfast.serving.engine import Engine, Handle
from vlmfast.serving.request import Event, QueueFull, Request, SamplingParams, ShuttingDown

__all__ = ["Engine", "Handle", "Event", "QueueFull", "Request", "SamplingParams", "ShuttingDown"]
