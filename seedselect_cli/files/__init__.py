"""Every on-disk format in one home: atomic writes, the run directory, seed files, the tensor cache,
images and the data-set adapters.

Nothing here imports `seedselect_cli.core` or the tool above it (tests/test_layers.py).
"""
