"""Command glue (click options, stdin, printing), one module per command; quantkit.cli assembles them."""
