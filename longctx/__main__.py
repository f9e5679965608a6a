"""`python -m longctx ...` is the `longctx` command."""
import sys

from longctx.launch.cli import main

sys.exit(main())
