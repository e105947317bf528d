import sys

from fhirsynth.cli import main

sys.exit(main())
