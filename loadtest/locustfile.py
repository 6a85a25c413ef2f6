"""`locust -f loadtest/locustfile.py`: the clip-triton load test (the code is loadtest/clip_loadtest/locustfile.py)."""

from clip_loadtest.locustfile import *  # noqa: F403 - locust collects the User classes and event hooks from here
