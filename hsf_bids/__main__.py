"""``python -m hsf_bids``: the same as the ``hsf-bids`` command."""

from hsf_bids.cli.run import cli

if __name__ == "__main__":
    cli()
