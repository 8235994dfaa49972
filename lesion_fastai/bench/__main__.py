"""python -m lesion_fastai.bench NAME: the benchmarks (the package's docstring lists them)."""
from ..log import hush_third_party
hush_third_party(__name__)       # run as a command: quiet known third-party warnings before fastai loads

import argparse

from . import __doc__ as DOC
from . import budget, datastats, efficiency, lesions, probe, scale, select, speed, study


def parser() -> argparse.ArgumentParser:
    "Every benchmark a subcommand, its flags from its settings dataclass."
    ap = argparse.ArgumentParser(prog='python -m lesion_fastai.bench', description=DOC.split('\n\n')[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = ap.add_subparsers(dest='which', required=True)
    for module in (efficiency, budget, study, select, speed, scale, datastats, lesions, probe): module.add_parser(sub)
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    return args.run(ap, args)


if __name__ == '__main__':
    main()
