"""kvctl: compress and manage the KV caches of LLM serving clusters."""

__version__ = "0.1.0"
