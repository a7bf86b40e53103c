"""``python -m ladder_siam.pretrain`` and ``torchrun -m ladder_siam.pretrain``.

The entry point every training pod runs; the loop is in :mod:`ladder_siam.pretrain.train`.
"""

import argparse
import logging

from ladder_siam.pretrain.train import get_args_parser, main

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main(argparse.ArgumentParser(parents=[get_args_parser()]).parse_args())
