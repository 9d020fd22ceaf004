#!/usr/bin/env python
"""Thin launcher script for the deepspeed launcher: ``deepspeed --num_gpus N tools/train.py RECIPE [k=v ...]``.

Same as ``deepspeed --num_gpus N --module mmsparse.train ...``; the logic lives in mmsparse.train.
"""

import sys

from mmsparse.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
