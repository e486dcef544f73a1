"""The codec worker: runtime (storage + events), jobs (the codec process pool), ops (the
command table) and app (its HTTP face)."""
