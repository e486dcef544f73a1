"""Bridges from kvctl's codecs into other serving stacks (each imports its host lazily)."""
