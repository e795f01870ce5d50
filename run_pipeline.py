#!/usr/bin/env python3
"""Entry point: `python run_pipeline.py --help` lists every option."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __name__ == "__main__":
    from pipeline.cli import main

    sys.exit(main())
