"""`cxr submit` and `cxr jobs` (placeholder until the screening job lands)."""
import click

COMMANDS: list[click.Command] = []
