"""`python -m lab.agent`: the orchestrator starts the agent this way, on the host or in a guest."""

import sys

from lab.agent.agent import main

sys.exit(main())
