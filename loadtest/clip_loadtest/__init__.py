"""Load and performance tooling: the Locust load test (`locustfile`), the shared workload (`workload`), the
in-process-vs-Triton benchmark (`bench`), the soak test (`soak`) and the perf_analyzer wrapper (`perf`)."""
