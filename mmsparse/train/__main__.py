"""``python -m mmsparse.train`` / ``deepspeed --num_gpus N --module mmsparse.train RECIPE [k=v ...]``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
