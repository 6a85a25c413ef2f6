"""Compose health check: the one check of clip_server.probe (every model ready AND one real zero_shot inference;
refused or late under load is busy, healthy, while Triton's counters show it executing). Exit 0 healthy, 1 not.

Configured by CLIP_HEALTH_URL, CLIP_METRICS_URL, CLIP_REPOSITORY, CLIP_HEALTH_TIMEOUT (see clip_server.probe).
"""

import sys

from clip_server.probe import main  # installed in the server image next to clip_runtime

if __name__ == "__main__":
    sys.exit(main())
