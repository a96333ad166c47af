import sys

try:  # Ctrl-C while torch is still being imported: one line, exit 130, like anywhere else
    from dptrain.cli import console
except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

if __name__ == "__main__":
    console()
