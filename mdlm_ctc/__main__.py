"""``python -m mdlm_ctc``: the same command line as ``mdlm-ctc``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
