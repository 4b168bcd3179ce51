import sys

from muai.cli import main

sys.exit(main())
