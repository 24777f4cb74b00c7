"""`python -m cli ...`: the same as the `lmqueue` command."""

import sys

from cli.main import main

sys.exit(main())
