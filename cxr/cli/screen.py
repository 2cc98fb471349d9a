"""`cxr screen` and `cxr report` (placeholder until the screening job lands)."""
import click

COMMANDS: list[click.Command] = []
