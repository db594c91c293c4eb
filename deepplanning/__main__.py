"""`python -m deepplanning DATA_DIR`: write the committed split from a data folder."""
from loading import ArgumentParser, UsageError

from .data import SPLIT_PATH, make_split


def main(argv=None):
    p = ArgumentParser(prog="python -m deepplanning",
                       description="Write the committed train/heldout split of the DeepPlanning "
                       "travel tasks (data/deepplanning_split.json) from a data folder.")
    p.add_argument("data_dir", help="the travel folder (data/, tools/, agent/, database/)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed within each trip length")
    args = p.parse_args(argv)
    try:
        split = make_split(args.data_dir, seed=args.seed)
    except UsageError as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {SPLIT_PATH}: {len(split['train'])} train, {len(split['heldout'])} heldout tasks")


if __name__ == "__main__":
    main()
