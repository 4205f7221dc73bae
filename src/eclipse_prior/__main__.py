"""`python -m eclipse_prior`: the same CLI as the `eclipse-prior` script (multi-process launchers need a module)."""

from eclipse_prior.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
