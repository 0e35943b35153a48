"""`python -m provider_router` is the `provider-router` command."""

import sys

from .cli import main

sys.exit(main())
