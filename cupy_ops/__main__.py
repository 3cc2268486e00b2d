import sys

from cupy_ops._cli import main

sys.exit(main())
