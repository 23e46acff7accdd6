"""Command line of the converter: ``fairchem-dens convert`` / ``python -m fairchem_dens.data``.

Importing this module is cheap (no torch / fairchem); the conversion itself is imported
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from fairchem_dens.data.options import (
    DEFAULT_SPLIT,
    ENERGY_UNITS_IN_EV,
    FORCE_UNITS_IN_EV_PER_ANGSTROM,
    STRESS_UNITS_IN_EV_PER_ANGSTROM3,
    ConversionError,
    ConversionOptions,
)
from fairchem_dens.data.reading import KNOWN_SUFFIXES

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["DESCRIPTION", "add_convert_arguments", "main", "register", "run_convert"]

_SUFFIX_TEXT = textwrap.fill(
    "Directory inputs are searched recursively for: " + " ".join(KNOWN_SUFFIXES) + ".", 84
)
SUMMARY = "convert ASE trajectories (.traj/.extxyz/.xyz/.db) into fairchem S2EF LMDBs"
DESCRIPTION = f"""\
Convert DFT trajectories readable by ASE into fairchem-core 1.x S2EF LMDBs
(train/val/test), plus per-element energy references and normaliser statistics
fitted on the train split.

Each input FILE is one system (trajectory); every frame needs an energy and forces.
Systems, never frames, are split into train/val/test. The system id (sid) comes from
the digits of the file name (random1234.traj -> 1234) when they are unique, otherwise
from the sorted file order; conversion.json records the mapping. Forces are the raw
DFT forces on all atoms (constraints ignored); FixAtoms atoms get fixed=1.

Systems are split by --split fractions after a --seed shuffle, or explicitly:
--val-systems/--test-systems name the held-out sids and every other system goes to
train (then --split must not be given and --seed is not used). Per-element energy
references are fitted on train, and elements absent from train get 0 eV, so hold out
systems whose elements all occur in train (conversion.json lists any others under
elements_missing_from_train).

Molecules (no periodic direction) are put in a cubic periodic box with at least
--box-padding Å of vacuum to their periodic images, so fairchem's radius_graph_pbc
(use_pbc: True, otf_graph: True) builds their graphs and torch-cluster is not needed;
keep the padding above the model cutoff.

{_SUFFIX_TEXT}
"""
EPILOG = """\
outputs (in --out):
  train/ val/ test/          data.lmdb + metadata.npz (LmdbDataset src = the folder)
  element_references.npz     per-element energies (eV), train split only
  energy_normalizer.npz      mean/rmsd of train energies after references (eV)
  forces_normalizer.npz      mean 0, rmsd of train forces (eV/Å)
  conversion.json            inputs, sid mapping, splits, frame counts, units, fits

examples:
  fairchem-dens convert "$(python -c 'import fairchem_dens.data as d; print(d.demo_data_dir())')" \\
      --out data/oc20_demo --split 0.7,0.15,0.15 --seed 0
  # demo data with a val split whose elements all occur in train:
  fairchem-dens convert "$(python -c 'import fairchem_dens.data as d; print(d.demo_data_dir())')" \\
      --out data/oc20_demo --val-systems 1000100,1000161
"""


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the converter's arguments to ``parser`` and return it."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="trajectory files, directories or (quoted) glob patterns",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument(
        "--split",
        default=None,
        metavar="TRAIN,VAL[,TEST]",
        help="fractions of systems per split (default: "
        f"{','.join(f'{value:g}' for value in DEFAULT_SPLIT)}); held-out splits get >= 1 "
        "system when there are enough systems; exclusive with --val-systems/--test-systems",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the system shuffle for --split (default: 0; not used with "
        "--val-systems/--test-systems)",
    )
    parser.add_argument(
        "--val-systems",
        default="",
        metavar="SID,SID,...",
        help="comma-separated system ids (sids) for the val split, e.g. 1000100,1000161; "
        "with this or --test-systems, every other system goes to train and --split/--seed "
        "are not used",
    )
    parser.add_argument(
        "--test-systems",
        default="",
        metavar="SID,SID,...",
        help="comma-separated system ids (sids) for the test split (see --val-systems)",
    )
    parser.add_argument(
        "--md-systems",
        default=None,
        type=Path,
        metavar="FILE",
        help="text file of system ids (one per line: 1000100 or OC20's random1000100) whose "
        "frames come from MD: every entry gets an md attribute, 1 for these systems and 0 "
        "otherwise, for optim.dens.skip_key: md (default: no md attribute)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=1,
        metavar="K",
        help="keep every K-th frame of each trajectory (default: 1)",
    )
    parser.add_argument(
        "--forces-normalizer",
        choices=("rms", "energy_std"),
        default="rms",
        help="scale in forces_normalizer.npz: rms = RMS of the train forces (default); "
        "energy_std = std of the train energies, the authors' MD17 force scale",
    )
    parser.add_argument(
        "--energy-unit",
        default="eV",
        metavar="UNIT",
        help=f"energy unit of the input, converted to eV: {', '.join(ENERGY_UNITS_IN_EV)} "
        "(default: eV)",
    )
    parser.add_argument(
        "--force-unit",
        default=None,
        metavar="UNIT",
        help="force unit of the input, converted to eV/Å: "
        f"{', '.join(FORCE_UNITS_IN_EV_PER_ANGSTROM)} (default: energy unit per Å)",
    )
    parser.add_argument(
        "--stress",
        action="store_true",
        help="also write each frame's stress as `stress` [1, 3, 3] in eV/Å^3 (fairchem's and "
        "ASE's convention: positive = tensile), from the frame's calculator",
    )
    parser.add_argument(
        "--stress-unit",
        default="eV/Å^3",
        metavar="UNIT",
        help="stress unit of the input (ASE sign convention), converted to eV/Å^3: "
        f"{', '.join(STRESS_UNITS_IN_EV_PER_ANGSTROM3)} (default: eV/Å^3)",
    )
    parser.add_argument(
        "--box-padding",
        type=float,
        default=15.0,
        metavar="ANGSTROM",
        help="vacuum (Å) between a molecule and its periodic images in the cubic box "
        "built for non-periodic frames; keep > model cutoff (default: 15, enough "
        "for cutoffs up to 12 Å)",
    )
    parser.add_argument(
        "--energy-key",
        default=None,
        metavar="KEY",
        help="read energies from atoms.info[KEY] instead of the calculator",
    )
    parser.add_argument(
        "--forces-key",
        default=None,
        metavar="KEY",
        help="read forces from atoms.arrays[KEY] instead of the calculator",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing converter outputs in --out"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the YAML snippet")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run a conversion from parsed arguments; return the process exit status."""
    from fairchem_dens.data.conversion import convert

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    try:
        options = ConversionOptions(
            inputs=args.inputs,
            out_dir=args.out,
            split=args.split,
            seed=args.seed,
            val_systems=args.val_systems,
            test_systems=args.test_systems,
            md_systems=args.md_systems,
            stride=args.stride,
            energy_unit=args.energy_unit,
            force_unit=args.force_unit,
            box_padding=args.box_padding,
            energy_key=args.energy_key,
            forces_key=args.forces_key,
            overwrite=args.overwrite,
            forces_normalizer=args.forces_normalizer,
            stress=args.stress,
            stress_unit=args.stress_unit,
        )
        summary = convert(options, log=log)
    except ConversionError as err:
        print(f"fairchem-dens convert: error: {err}", file=sys.stderr)
        return 2
    missing = {k: v for k, v in summary["elements_missing_from_train"].items() if v}
    if missing:
        log(
            f"warning: elements absent from train get reference 0 eV: {missing}; choose "
            "held-out systems whose elements occur in train with --val-systems/--test-systems"
        )
    log(f"wrote {args.out}; add this to your fairchem config:")
    print(summary["config_snippet"], end="")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert`` on the subparsers of the ``fairchem-dens`` command."""
    parser = subparsers.add_parser(
        "convert",
        help=SUMMARY,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_convert_arguments(parser)
    parser.set_defaults(func=run_convert)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m fairchem_dens.data`` (same options as ``convert``)."""
    parser = argparse.ArgumentParser(
        prog="python -m fairchem_dens.data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return run_convert(add_convert_arguments(parser).parse_args(argv))
