"""``python -m lsm_train``: the same as the ``lsm-train`` console script."""

from lsm_train.app import main

if __name__ == "__main__":
    main()
