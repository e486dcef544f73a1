"""The controller: routes commands to workers by instance, tracks events and workers."""

from kvctl.server.controller.core import Controller
from kvctl.server.controller.state import ControlState, MemoryState, RedisState, open_state

__all__ = ["ControlState", "Controller", "MemoryState", "RedisState", "open_state"]
