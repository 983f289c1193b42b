"""`python -m handseg ...` (and `torchrun -m handseg train ...`)."""

from handseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
