import sys

from .main import main

# Guarded: vLLM starts its engine core with multiprocessing's spawn, which imports this module again.
if __name__ == "__main__":
    sys.exit(main())
