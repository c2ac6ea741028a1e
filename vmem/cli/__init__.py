"""The ``vmem`` command: argument parsing (:mod:`~vmem.cli.args`), the live display
(:mod:`~vmem.cli.display`), the local commands (:mod:`~vmem.cli.main`) and the commands
that talk to a host agent (:mod:`~vmem.cli.agent`)."""
