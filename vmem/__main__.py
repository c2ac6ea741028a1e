import sys

from vmem.cli.main import main

sys.exit(main())
