"""The method: SeedSelect's sampler, losses, starts and optimisation, with no command line and no files.

Nothing here imports the config, Hydra, OmegaConf or `seedselect_cli.files` (tests/test_layers.py).
"""
