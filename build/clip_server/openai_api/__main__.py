"""`python -m clip_server.openai_api`: `clip-triton openai` without the rest of the CLI."""

import sys

from . import main

sys.exit(main())
