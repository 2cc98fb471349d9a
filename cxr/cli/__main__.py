"""``python -m cxr.cli``: the entrypoint of cluster jobs, where the ``cxr`` script may not be on PATH."""

from cxr.cli import main

if __name__ == "__main__":
    main(prog_name="cxr")
