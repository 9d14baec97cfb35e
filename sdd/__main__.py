import sys

from sdd.cli import main

sys.exit(main())
