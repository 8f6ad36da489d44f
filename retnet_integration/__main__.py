import sys

from gqa_lut.cli import main

sys.exit(main(["retnet", *sys.argv[1:]]))
