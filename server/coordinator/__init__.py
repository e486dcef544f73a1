"""kvctl as the coordinator of LMCache multiprocess servers (`kvctl serve --coordinator-port`).
"""
