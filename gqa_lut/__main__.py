import sys

from gqa_lut.cli import main

sys.exit(main())
