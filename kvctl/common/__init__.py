"""What the CLI and the server both use: the embedded models, tokenizers, the codec benchmark,
the bundled texts and kvctl's cache folder.

Nothing here imports the server package or the CLI, so the CLI can tokenize and benchmark
without loading the server, and the server can load models without the CLI.
"""
