import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C in the first moments of `python -m dpq`, before main() can catch it
    print("dpq: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
