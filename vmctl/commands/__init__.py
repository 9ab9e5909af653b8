"""vmctl's commands, one module per noun; each lists its click commands in ``COMMANDS``
(added to the ``vmctl`` group by :mod:`vmctl.main`)."""
