import sys

from llmq.cli.main import main

sys.exit(main())
