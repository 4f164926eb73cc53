import sys

from diffcolor.cli import main

sys.exit(main())
