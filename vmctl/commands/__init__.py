"""vmctl's commands, one module per noun; each has ``register(cli)``."""
