"""The `kvd` command line: one module per command, errors a user can fix printed, not raised."""
