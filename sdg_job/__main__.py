import os
import sys

from sdg_job.supervise import DRIVER_ENV, supervise

# `run` goes through a light supervisor (nothing of the job outlives it, even when it is SIGKILLed); it starts
# this same command again as the driver, with DRIVER_ENV set. Before config or Ray is imported.
if sys.argv[1:2] == ["run"] and not os.environ.get(DRIVER_ENV) and sys.platform.startswith("linux"):
    sys.exit(supervise([sys.executable, "-m", "sdg_job", *sys.argv[1:]]))

from sdg_job.cli import main  # noqa: E402

sys.exit(main())
