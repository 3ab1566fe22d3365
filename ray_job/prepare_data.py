"""`python -m ray_job.prepare_data`: text to the trainer's parquet layout (data/prepare.py)."""

import sys

from data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
