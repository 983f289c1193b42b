"""The typed core of handseg: plain functions with no Typer in them, usable from Python."""
