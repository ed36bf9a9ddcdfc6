import sys

from actclust.cli import main

sys.exit(main())
