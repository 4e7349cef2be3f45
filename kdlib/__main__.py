import sys

try:
    from .cli import INTERRUPTED, main
except KeyboardInterrupt:  # Ctrl-C while kdlib imports: nothing started
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
