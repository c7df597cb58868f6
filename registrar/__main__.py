from registrar.cli import entry

entry()
