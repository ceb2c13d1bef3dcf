import sys

from slimserve.cli import main

sys.exit(main())
