"""Command line interface: thin argparse layers over the pipeline and the operator."""
