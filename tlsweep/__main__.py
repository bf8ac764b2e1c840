import sys

from tlsweep.cli import main

sys.exit(main())
