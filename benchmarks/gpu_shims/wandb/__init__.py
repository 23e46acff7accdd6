"""Empty stand-in for ``wandb`` on a bare GPU image (see ../README.md): importable, unusable."""
