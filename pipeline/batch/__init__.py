"""The `batch-pipeline` command (main.py) and its rendering (render.py)."""

import os

# Polars runs on one thread in the job unless the user sets POLARS_MAX_THREADS. The job's
# stages already run side by side in threads, and polars' pool on chunks of a few
# thousand rows costs more than it gains: its idle workers spin between calls. Measured
# on 1M rows (2 cores): about 5% less CPU per row and a third of the context switches.
# It must be set before polars is first imported, hence here, before main.py's imports.
os.environ.setdefault("POLARS_MAX_THREADS", "1")
