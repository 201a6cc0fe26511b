import sys

from fastkeys.cli.main import main

sys.exit(main())
