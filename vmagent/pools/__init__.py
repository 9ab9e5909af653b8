"""Warm pools (docs/ci.md): clones of a template kept restored, re-identified and
paused, handed over under their final name in well under a second."""
