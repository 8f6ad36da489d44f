"""`python -m retnet_integration ...` is `gqa-lut retnet ...` (retnet_integration/cli.py)."""
import sys

from gqa_lut.cli import main

sys.exit(main(["retnet", *sys.argv[1:]]))
