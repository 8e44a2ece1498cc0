import sys

from sr_tune.cli import main

sys.exit(main())
