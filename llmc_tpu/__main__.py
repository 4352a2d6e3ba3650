import sys

from llmc_tpu.cli import main

sys.exit(main())
