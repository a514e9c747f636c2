import sys

from sdg_job.cli import main

sys.exit(main())
