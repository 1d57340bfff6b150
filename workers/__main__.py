import sys

from workers.bootstrap import main

sys.exit(main())
