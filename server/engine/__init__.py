"""The small inference engine that fills the worker's store with real KV."""
