"""The ``vmem`` command: argument parsing (:mod:`~vmem.cli.args`), the live display
(:mod:`~vmem.cli.display`), the local commands (:mod:`~vmem.cli.main`), the commands
that talk to a host agent (:mod:`~vmem.cli.agent`), and one module per analysis or
regression command -- its arguments and runner, loaded only when it runs, the work itself
in :mod:`vmem.analysis` or :mod:`vmem.bench`: :mod:`~vmem.cli.profile`,
:mod:`~vmem.cli.predict`, :mod:`~vmem.cli.calibrate`, :mod:`~vmem.cli.compare`,
:mod:`~vmem.cli.graph`, :mod:`~vmem.cli.inspect_cmd` (``vmem inspect``) and
:mod:`~vmem.cli.bench` (``vmem bench``, ``vmem trend``)."""
