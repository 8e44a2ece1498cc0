from sr_tune.cli import entry

entry()
