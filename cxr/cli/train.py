"""`cxr train`."""
import click

COMMANDS: list[click.Command] = []
